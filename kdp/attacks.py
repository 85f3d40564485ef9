"""The paper's attack suite, built on torchattacks (not re-implemented).

Each entry of ATTACKS is a factory `(model, **overrides) -> torchattacks.Attack`. The model
is the one attacked: the classifier alone for the paper's (preprocessor-blind) protocol,
or `Purified(purifier, classifier)` for an end-to-end (adaptive) attack. Images are in
[0, 1] and normalization lives inside the classifier, so no `set_normalization_used`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torchattacks

from kdp.models import lookup

ATTACKS: dict[str, Callable[..., torchattacks.attack.Attack]] = {
    "pgd8": partial(torchattacks.PGD, eps=8 / 255, alpha=2 / 255, steps=20, random_start=True),
    "pgd16": partial(torchattacks.PGD, eps=16 / 255, alpha=2 / 255, steps=20, random_start=True),
    "fgsm": partial(torchattacks.FGSM, eps=8 / 255),
    "bim": partial(torchattacks.BIM, eps=8 / 255, alpha=2 / 255, steps=20),
    "cw": partial(torchattacks.CW, c=1.0, kappa=0.0, steps=40, lr=0.01),
    "autoattack": partial(torchattacks.AutoAttack, norm="Linf", eps=8 / 255, version="standard",
                          n_classes=10, seed=0),
}
# L-inf budget of each attack (None: CW is L2 and unbounded in L-inf).
LINF_EPS = {"pgd8": 8 / 255, "pgd16": 16 / 255, "fgsm": 8 / 255, "bim": 8 / 255,
            "cw": None, "autoattack": 8 / 255}
PAPER_SUITE = ("pgd8", "pgd16", "fgsm", "bim", "cw", "autoattack")


def build_attack(name: str, model: nn.Module, **overrides) -> torchattacks.attack.Attack:
    """Build attack `name` against `model` (which must already sit on its device)."""
    for key in ("eps", "alpha"):
        if key in overrides and overrides[key] < 0:
            raise ValueError(f"attack {name}: {key} must be >= 0, got {overrides[key]}")
    return lookup(ATTACKS, name, "attack")(model, **overrides)


def linf_budget(name: str, **overrides) -> float | None:
    """The L-inf radius that attack `name` promises to respect (None if it is not L-inf)."""
    lookup(ATTACKS, name, "attack")
    return overrides.get("eps", LINF_EPS[name])


def attack_batches(attack, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                   start: int = 0, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Yield adversarial batches of float images `x` (in [0, 1]), each seeded by its global
    position (seed, start + offset) so that any sharding of the data gives the same AEs."""
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if xb.is_cuda else []):
            torch.manual_seed(seed * 1_000_003 + start + i)
            yield attack(xb, yb).detach()
