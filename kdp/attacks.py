"""The attack suite, built on torchattacks (not re-implemented).

Each attack is one `Attack` record in ATTACKS (its factory `(model, **overrides) ->
torchattacks.Attack`, L-inf budget, seeding, subset and label; docs/extending.md). The model
is the one attacked: the classifier alone for the paper's (preprocessor-blind) protocol,
or `Purified(purifier, classifier)` for an end-to-end (adaptive) attack. Images are in
[0, 1] and normalization lives inside the classifier, so no `set_normalization_used`.

Two AutoAttacks:
- `autoattack` is torchattacks' `AutoAttack(version="standard")`, whose APGD, APGD-T and FAB
  keep torchattacks' default of 10 steps: likely the paper's setting, weaker than the field's.
- `aa-standard` is AutoAttack at the strengths of Croce & Hein (2020) and RobustBench,
  composed from torchattacks' own pieces: APGD-CE 100 steps; APGD-T 9 target classes x 100
  steps; FAB-T 9 targets x 100 steps; Square 5000 queries; 1 restart each, run in sequence on
  the images still classified correctly (`MultiAttack`). Its Square uses the original's
  schedule (`resc_schedule=False`; torchattacks' default rescales it).
Both take the evaluation's seed (`build_attack(..., seed=)`); the other attacks draw from
torch's generator, which `attack_batches` seeds per batch.
`describe` reads the settings back from a built attack, so a row records what really ran,
with every setting that differs from torchattacks' default for that piece; `settings` reads
all of them (the evaluation AE cache's key).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn as nn

from kdp.models import lookup
from kdp.errors import ConfigError

if TYPE_CHECKING:
    import torchattacks

EPS = 8 / 255


def ta(cls: str, **settings: Any) -> Callable[..., torchattacks.attack.Attack]:
    """A factory of `torchattacks.<cls>` at `settings` (a call's overrides win). torchattacks
    is imported at the first call: its import (and scipy's) costs each process about a second,
    and most of a run's processes never attack."""
    def make(model: nn.Module, **overrides: Any) -> torchattacks.attack.Attack:
        import torchattacks

        return getattr(torchattacks, cls)(model, **{**settings, **overrides})
    make.__name__ = make.__qualname__ = f"ta_{cls}"
    return make


def aa_standard(model: nn.Module, eps: float = EPS, seed: int = 0, n_classes: int = 10,
                steps: int = 100, n_queries: int = 5000) -> torchattacks.MultiAttack:
    """AutoAttack 'standard' (L-inf) at the original strengths (see the module docstring)."""
    import torchattacks

    common = dict(norm="Linf", eps=eps, seed=seed, n_restarts=1)
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, steps=steps, loss="ce", **common),
        torchattacks.APGDT(model, steps=steps, n_classes=n_classes, **common),
        torchattacks.FAB(model, steps=steps, multi_targeted=True, n_classes=n_classes, **common),
        torchattacks.Square(model, n_queries=n_queries, resc_schedule=False, **common)])


@dataclass(frozen=True)
class Attack:
    """One attack of the suite, declared once (in ATTACKS below)."""
    name: str
    """Its name in configs (`eval.attacks`, ...) and the `attack` column."""
    label: str
    """Its name in tables and plots."""
    factory: Callable[..., torchattacks.attack.Attack]
    """(model, **overrides) -> a torchattacks attack on `model`, at kdp's settings."""
    linf_eps: float | None
    """The L-inf radius it promises to respect (a row's `check.linf_ok`); None: not L-inf (CW)."""
    seeded: bool = False
    """Takes the evaluation's seed itself (the others draw from torch's generator, seeded per batch)."""
    subset: bool = False
    """Costly per image: runs on the first EvalConfig.aa_subset test images only."""
    paper: bool = False
    """In the paper's Table 1 suite (PAPER_SUITE)."""
    iterates: str | None = None
    """What its iterates are read for (kdp.trace): 'ce', iterates ascending cross-entropy on the whole
    batch (silent success and incomplete optimization); 'other', another objective (silent success
    only); None, one step, or pieces that query subsets of the batch (AutoAttack)."""
    dominates: tuple[str, ...] = ()
    """Attacks it is at least as strong as, on the same images and threat model (more steps or restarts
    at the same ε, a larger ε, full strength): leaving more images correct fires `stronger_attack_weaker`."""
    curve: bool = False
    """A point of the accuracy-vs-ε curve (`full`, EvalConfig.eps_curve): in the report's plot and the
    indicators, not in the tables."""


# The accuracy-vs-ε curve's radii, in 1/255: PGD-20, step max(2/255, 2.5 ε / 20) (Madry et al.'s rule, so
# that 20 steps cross the ball); 255 covers all of [0, 1]: the unbounded attack.
CURVE_EPS = (1, 2, 4, 8, 16, 32, 64, 128, 255)


def curve_name(k: int) -> str:
    return f"pgd20-eps{k}"


def _curve(k: int) -> Attack:
    return Attack(curve_name(k), f"PGD-20 ε={k}/255", ta("PGD", eps=k / 255, alpha=max(2, 2.5 * k / 20) / 255,
                                                      steps=20, random_start=True),
                  k / 255, iterates="ce", dominates=tuple(curve_name(j) for j in CURVE_EPS if j < k), curve=True)


_EIGHT = ("fgsm", "pgd8", "bim", "pgd100", "autoattack")  # the L-inf 8/255 attacks aa-standard must match or beat
ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("pgd8", "PGD8", ta("PGD", eps=EPS, alpha=2 / 255, steps=20, random_start=True), EPS, paper=True,
           iterates="ce"),
    Attack("pgd16", "PGD16", ta("PGD", eps=16 / 255, alpha=2 / 255, steps=20, random_start=True),
           16 / 255, paper=True, iterates="ce", dominates=("pgd8",)),
    Attack("pgd100", "PGD-100", ta("PGD", eps=EPS, alpha=2 / 255, steps=100, random_start=True), EPS,
           iterates="ce", dominates=("pgd8",)),
    Attack("fgsm", "FGSM", ta("FGSM", eps=EPS), EPS, paper=True),
    Attack("bim", "BIM", ta("BIM", eps=EPS, alpha=2 / 255, steps=20), EPS, paper=True, iterates="ce"),
    Attack("cw", "CW", ta("CW", c=1.0, kappa=0.0, steps=40, lr=0.01), None, paper=True, iterates="other"),
    Attack("autoattack", "AA (10-step)", ta("AutoAttack", norm="Linf", eps=EPS, version="standard", n_classes=10,
                                            seed=0), EPS, seeded=True, paper=True),
    Attack("aa-standard", "AA (standard)", aa_standard, EPS, seeded=True, subset=True,
           dominates=_EIGHT),
    *(_curve(k) for k in CURVE_EPS),
)}
PAPER_SUITE = tuple(n for n, a in ATTACKS.items() if a.paper)  # EvalConfig's default, with aa-standard
BLACKBOX = ("Square",)  # pieces that read outputs only: beating the gradient pieces fires blackbox_beats_whitebox
# Attributes that name or report but do not change what an attack crafts.
NOT_SETTINGS = ("model_name", "verbose", "supported_mode")


def build_attack(name: str, model: nn.Module, seed: int | None = None, **overrides) -> torchattacks.attack.Attack:
    """Build attack `name` against `model` (which must already sit on its device); `seed`
    reaches the attacks that have one (`Attack.seeded`)."""
    for key in ("eps", "alpha"):
        if key in overrides and overrides[key] < 0:
            raise ConfigError(f"attack {name}: {key} must be >= 0, got {overrides[key]}")
    attack = lookup(ATTACKS, name, "attack")
    if seed is not None and attack.seeded:
        overrides["seed"] = seed
    return attack.factory(model, **overrides)


def linf_budget(name: str, **overrides) -> float | None:
    """The L-inf radius that attack `name` promises to respect (None if it is not L-inf)."""
    return overrides.get("eps", lookup(ATTACKS, name, "attack").linf_eps)


def _pieces(attack) -> list:
    inner = getattr(attack, "_autoattack", attack)  # torchattacks.AutoAttack wraps a MultiAttack
    return list(getattr(inner, "attacks", [inner]))


def _settings_of(a) -> dict:
    """One piece's settings: its public plain-valued attributes."""
    return {k: v for k, v in sorted(vars(a).items()) if not k.startswith("_") and k not in NOT_SETTINGS
            and isinstance(v, (bool, int, float, str, type(None)))}


def settings(attack) -> list[dict]:
    """Every setting of every piece of a built attack, read from its objects, with the
    torch and torchattacks versions (what its AEs follow from, besides model, seed and images)."""
    import torchattacks

    versions = {"torch": torch.__version__, "torchattacks": torchattacks.__version__}
    return [{"class": type(a).__name__, **_settings_of(a)} for a in _pieces(attack)] + [versions]


def settings_of(name: str, **overrides) -> list[dict]:
    """`settings` of attack `name` as the registry builds it (on a stand-in model)."""
    return settings(build_attack(name, nn.Linear(1, 1), **overrides))


def _changed(a) -> str:
    """The settings of piece `a` that differ from its class's defaults, e.g. 'steps=100'."""
    probe = nn.Linear(1, 1).to(next(a.model.parameters(), torch.zeros(0)).device)
    try:
        default = _settings_of(type(a)(probe))
    except TypeError:  # a piece without defaults for its other arguments
        return ""
    mine = _settings_of(a)
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in mine.items() if k in default and default[k] != v)


def _describe_one(a) -> str:
    name = type(a).__name__
    if name in ("APGD", "APGDT", "FAB"):
        tag = {"APGD": f"APGD-{getattr(a, 'loss', 'ce').upper()}", "APGDT": "APGD-T",
               "FAB": "FAB-T" if getattr(a, "multi_targeted", False) else "FAB"}[name]
        targets = f"{a.n_target_classes} targets x " if name == "APGDT" or tag == "FAB-T" else ""
        return f"{tag} {targets}{a.steps} steps x {a.n_restarts} restart(s)"
    if name == "Square":
        return f"Square {a.n_queries} queries x {a.n_restarts} restart(s)"
    if hasattr(a, "steps"):
        start = ", random start" if getattr(a, "random_start", False) else ""
        return f"{name} {a.steps} steps{start}"
    return f"{name} 1 step" if name == "FGSM" else name


def describe(attack) -> dict:
    """What a built attack runs, read from its objects: `attack.settings` (one line; each
    piece's settings that differ from torchattacks' defaults in brackets),
    `attack.steps` (iterations per restart of its first piece; Square: queries) and
    `attack.restarts` (restarts of its first piece; 1 for a random start or none)."""
    pieces = _pieces(attack)
    first = pieces[0]
    steps = getattr(first, "steps", getattr(first, "n_queries", 1))
    lines = [_describe_one(a) + (f" [{c}]" if (c := _changed(a)) else "") for a in pieces]
    return {"attack.settings": "; ".join(lines), "attack.steps": int(steps),
            "attack.restarts": int(getattr(first, "n_restarts", 1))}


def attack_batches(attack, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                   start: int = 0, device: torch.device | str = "cpu", watch=None) -> Iterator[torch.Tensor]:
    """Yield adversarial batches of float images `x` (in [0, 1]), each seeded by its global
    position (seed, start + offset) so that any sharding of the data gives the same AEs.
    `watch` (kdp.trace.Watch) sees each batch before the attack and may replace its result after."""
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if xb.is_cuda else []):
            torch.manual_seed(seed * 1_000_003 + start + i)
            if watch is None:
                yield attack(xb, yb).detach()
                continue
            watch.begin(xb, yb)
            yield watch.end(attack(xb, yb).detach())


def madry_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
              gen: torch.Generator | None = None) -> torch.Tensor:
    """The adversarial-training attack (Madry et al. 2018): a uniform random start in the L-inf ball
    of radius eps, then `steps` signed-gradient ascent steps of size alpha on the cross-entropy, each
    projected into the ball and [0, 1]. Only the input gets a gradient; the model's mode is the
    caller's (kdp's recipes attack in eval mode: `kdp.train.evaluating`)."""
    noise = torch.rand(x.shape, generator=gen).to(x.device) if gen is not None else torch.rand_like(x)
    x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(model(x_adv).float(), y)
            (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
