"""`e2e_at`: a purifier trained against the full white-box threat. The teachers' CAE, trained
on PGD AEs crafted at every step through purifier∘frozen classifier (adversarial training of the
purifier's weights, as in Madry et al. 2018 with the classifier frozen behind the purifier):
cross-entropy of the classifier on the purified AE + beta * reconstruction MSE to the clean
image, plus, optionally, gamma * the paper's distillation loss (Eq. 5) to the AT and/or NT
teachers. The paper's purifiers only ever see AEs crafted on the classifier alone; this one is
judged under the threat it was trained for.

Choices (kdp's pick): AEs crafted with the purifier in eval mode, PGD-7 at 2/255 (Madry's
CIFAR setting) from a random start, no augmentation (as the paper's purifiers), Adam at the
teachers' rate.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.attacks import madry_pgd
from kdp.checkpoint import load_frozen
from kdp.config import TEACHER_KINDS, PurifierTraining, Runtime, nonnegative, one_of, positive, require
from kdp.data import Cifar, to_float
from kdp.defenses import Defense, register
from kdp.losses import kd_loss
from kdp.models import ConvAutoencoder
from kdp.train import Recipe, evaluating, seed_all


@dataclass(frozen=True)
class E2EATConfig(PurifierTraining):
    """Baseline: the teachers' CAE adversarially trained end to end through the frozen classifier.
    Its other fields are the CAE's and Adam's (kdp.config.PurifierTraining)."""
    eps: float = 8 / 255
    """L-inf radius of the training AEs (the run's evaluation radius)."""
    alpha: float = 2 / 255
    """PGD step size (Madry's CIFAR setting)."""
    steps: int = 7
    """PGD steps per batch through purifier∘classifier: steps + 1 passes through both per image."""
    beta: float = 0.5
    """Weight of the reconstruction MSE to the clean image beside the cross-entropy (the student's beta)."""
    gamma: float = 0.0
    """Weight of the distillation loss (Eq. 5) to `teachers`; 0: none (its stage then waits for no teacher)."""
    teachers: tuple[str, ...] = ("at", "nt")
    """Teachers distilled from when gamma > 0 (the AT teacher sees the AE, the NT teacher the clean image)."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "teachers", tuple(self.teachers))
        positive(self, "steps")
        nonnegative(self, "eps", "alpha", "beta", "gamma")
        require(len(self.teachers) > 0 and len(set(self.teachers)) == len(self.teachers),
                f"E2EATConfig.teachers must be a non-empty set of at/nt, got {self.teachers}")
        for t in self.teachers:
            one_of(t, TEACHER_KINDS, "teacher")

    @property
    def passes(self) -> int:
        """Forward-backward passes through purifier∘classifier per training image, over the whole training."""
        return self.epochs * (self.steps + 1)


def e2e_needs(cfg: E2EATConfig) -> tuple[str, ...]:
    """The frozen classifier, and the teachers only when it distils from them."""
    return ("classifier", *(f"teacher_{t}" for t in cfg.teachers if cfg.gamma > 0))


def e2e_step(cfg: E2EATConfig, purifier, model, x_all, y_all, classifier, teachers: dict, gen, acc: Accel):
    """One batch: PGD through the purifier (eval mode) and classifier, then CE + beta * MSE (+ gamma * KD)
    of `model` (the purifier, possibly data-parallel) on the AEs."""
    def step(idx):
        x, y = acc.images(x_all[idx.to(x_all.device)]), y_all[idx.to(y_all.device)]
        with evaluating(purifier):
            x_adv = madry_pgd(lambda t: classifier(purifier(t)), x, y, cfg.eps, cfg.alpha, cfg.steps, gen)
        with acc.autocast():
            out = model(x_adv)
            logits = classifier(out)
        out, ce = out.float(), F.cross_entropy(logits.float(), y)
        recon = F.mse_loss(out, x)
        parts = {"ce": ce.detach(), "recon": recon.detach(), "adv_acc": (logits.argmax(1) == y).float().mean()}
        loss = ce + cfg.beta * recon
        if cfg.gamma > 0:
            with torch.no_grad():
                t_outs = [teachers[k](x_adv if k == "at" else x).float() for k in cfg.teachers]
            kd = kd_loss(out, t_outs)
            loss, parts["kd"] = loss + cfg.gamma * kd["loss"], kd["loss"].detach()
        return {"loss": loss, **parts}
    return step


def e2e_recipe(cfg: E2EATConfig, inputs: dict, data: Cifar, device, rt: Runtime, rank: int = 0) -> Recipe:
    """Inputs 'classifier' and, with gamma > 0, 'teacher_<k>' for each of cfg.teachers."""
    missing = [k for k in e2e_needs(cfg) if inputs.get(k) is None]
    if missing:
        raise ValueError(f"e2e_at needs the checkpoints of {missing}")
    acc = Accel.of(rt, device)
    frozen = {k: acc.module(load_frozen(Path(p), device)) for k, p in inputs.items() if k in e2e_needs(cfg)}
    teachers = {k.removeprefix("teacher_"): m for k, m in frozen.items() if k.startswith("teacher_")}
    seed_all(cfg.seed)
    purifier = acc.module(ConvAutoencoder(**E2E_AT.kwargs(cfg)).to(device))
    opt = torch.optim.Adam(purifier.parameters(), lr=cfg.lr)
    x_all, y_all = to_float(data.train_x).to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def finish(history):
        return purifier, E2E_AT.spec(cfg), {"final": history[-1] if history else {}, "passes": cfg.passes,
                                            "history": history}

    return Recipe(purifier, opt, None,
                  lambda m: e2e_step(cfg, purifier, m, x_all, y_all, frozen["classifier"], teachers, gen, acc),
                  len(x_all), finish, generators=(gen,))


E2E_AT = register(Defense("e2e_at", "E2E-AT CAE", E2EATConfig, ConvAutoencoder, e2e_recipe, needs=e2e_needs,
                          cost=4.0))
