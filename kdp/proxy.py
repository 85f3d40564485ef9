"""The per-epoch proxy of a student's robustness: what a sweep's early stopping (ASHA) ranks
trials by, because a trial's real robust accuracy exists only after its full evaluation.

After each epoch, `proxy_acc` is the student's accuracy under PGD-10 (random start, step eps/4)
at the eps of its training AEs, on the first `StudentConfig.proxy_n` test images, under
`proxy_threat`: `classifier` crafts the AEs on the classifier once (they do not depend on the
purifier), `full` crafts them through purifier and classifier after every epoch. It is a cheap
signal, not a result: too few images and steps for a table. It runs under its own random
state (the training's is left as it was), in eval mode, on rank 0 only.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from kdp.attacks import attack_batches, build_attack
from kdp.config import StudentConfig, ThreatModel
from kdp.data import Cifar, to_float
from kdp.errors import ConfigError
from kdp.files import read_json
from kdp.train import evaluating, predict

STEPS = 10
BATCH = 256
SEED = 0
METRIC = "proxy_acc"  # its name in epoch metrics, events, TensorBoard and Tune results
ATTACK = f"proxy-pgd{STEPS}"  # its `attack` column in a stopped trial's row


def ae_eps(aes_dir: Path) -> float:
    """The eps the training AEs of an AE cache entry were crafted at."""
    return float(read_json(Path(aes_dir) / "meta.json", "AE cache meta.json")["config"]["eps"])


def _pgd(model: nn.Module, eps: float):
    """The registry's PGD (random start) at the proxy's eps, step and steps."""
    return build_attack("pgd8", model, eps=eps, alpha=eps / 4, steps=STEPS)


def build_proxy(cfg: StudentConfig, student: nn.Module, classifier: nn.Module, data: Cifar, aes_dir: Path,
                device: torch.device):
    """() -> {"proxy_acc": accuracy} of `student` now, or None when cfg.proxy_n is 0."""
    if cfg.proxy_n == 0:
        return None
    n = cfg.proxy_n
    if n > len(data.test_y):
        raise ConfigError(f"proxy_n {n}: more than the {len(data.test_y)} test images the run has")
    x, y = to_float(data.test_x[:n]), data.test_y[:n]
    eps = ae_eps(aes_dir)
    fixed = None
    if cfg.proxy_threat == ThreatModel.CLASSIFIER:  # crafted once, on the classifier alone
        fixed = torch.cat(list(attack_batches(_pgd(classifier, eps), x, y, BATCH, SEED, device=device)))
    # in eval mode as a whole: torchattacks puts a model it found training back into training mode
    whole = nn.Sequential(student, classifier).eval()

    def proxy() -> dict:
        with evaluating(student):
            x_adv = fixed if fixed is not None else torch.cat(list(
                attack_batches(_pgd(whole, eps), x, y, BATCH, SEED, device=device)))
            return {METRIC: (predict(whole, x_adv, device, BATCH) == y).float().mean().item()}
    return proxy
