"""`at_classifier`: adversarial training of the classifier itself (Madry et al. 2018, "Towards
Deep Learning Models Resistant to Adversarial Attacks", ICLR), the reference every test-time
defense is compared with (Croce et al. 2022). The classifier's own architecture, data and SGD
recipe; each batch is replaced by PGD AEs with a random start at the run's radius, crafted on
the model being trained. No purifier: the defense is its own classifier, so the `classifier`
and `full` threat models are one attack on one model (kdp runs it once: `same_threats`).

Choices (kdp's pick): the AEs are crafted in eval mode (batch norm's running statistics, as
TRADES' and Rice et al.'s code do), PGD-7 at 2/255 (Madry's CIFAR setting), the clean
classifier's augmentation and cosine schedule; no early stopping.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.attacks import madry_pgd
from kdp.config import ClassifierConfig, Runtime, nonnegative, positive
from kdp.data import Cifar, augment, to_float
from kdp.defenses import Defense, register
from kdp.models import CLASSIFIERS, lookup
from kdp.train import Recipe, evaluating, predict, seed_all, sgd_cosine


@dataclass(frozen=True)
class ATClassifierConfig(ClassifierConfig):
    """Baseline: the classifier adversarially trained (Madry et al. 2018), no purifier. Its other
    fields are the classifier recipe's (kdp.config.ClassifierConfig)."""
    eps: float = 8 / 255
    """L-inf radius of the training AEs (the run's evaluation radius)."""
    alpha: float = 2 / 255
    """PGD step size (Madry's CIFAR setting)."""
    steps: int = 7
    """PGD steps per training batch (Madry's CIFAR setting): each batch costs steps + 1
    forward-backward passes, the clean recipe's one."""

    def __post_init__(self):
        super().__post_init__()
        positive(self, "steps")
        nonnegative(self, "eps", "alpha")

    @property
    def passes(self) -> int:
        """Forward-backward passes of the classifier per training image, over the whole training."""
        return self.epochs * (self.steps + 1)


class ATClassifier(nn.Module):
    """The identity in front of its own adversarially trained classifier (`own_classifier`): the
    evaluation scores it like any defense, and under `full` attacks exactly the classifier."""
    same_threats = True  # `full` attacks the same model as `classifier`: its rows are said once

    def __init__(self, arch: str = "resnet56", width: int = 16):
        super().__init__()
        self.net = lookup(CLASSIFIERS, arch, "classifier")(width=width)

    @property
    def own_classifier(self) -> nn.Module:
        return self.net

    def forward(self, x):
        return x


def at_step(cfg: ATClassifierConfig, net: nn.Module, model: nn.Module, x_all, y_all, gen: torch.Generator,
            acc: Accel):
    """One batch: augmented images, replaced by PGD AEs crafted on `net` in eval mode, then the
    cross-entropy of `model` (net, possibly data-parallel) on them in train mode."""
    def step(idx):
        x = acc.images(augment(to_float(x_all[idx.to(x_all.device)]), gen))
        y = y_all[idx.to(y_all.device)]
        with evaluating(net):
            x_adv = madry_pgd(net, x, y, cfg.eps, cfg.alpha, cfg.steps, gen)
        with acc.autocast():
            logits = model(x_adv)
        loss = F.cross_entropy(logits.float(), y)
        return {"loss": loss, "adv_acc": (logits.argmax(1) == y).float().mean()}
    return step


def at_recipe(cfg: ATClassifierConfig, inputs: dict, data: Cifar, device, rt: Runtime, rank: int = 0) -> Recipe:
    """PGD adversarial training (no inputs). The recipe trains the network inside the defense
    (data-parallel allowed); the checkpoint is the defense, identity and network."""
    seed_all(cfg.seed)
    acc = Accel.of(rt, device)
    defense = acc.module(ATClassifier(**AT_CLASSIFIER.kwargs(cfg)).to(device))
    net = defense.net
    opt, sched = sgd_cosine(net.parameters(), cfg)
    x_all, y_all = data.train_x.to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def finish(history):
        test_acc = (predict(net, data.test_x, device) == data.test_y).float().mean().item()
        return defense, AT_CLASSIFIER.spec(cfg), {"test_acc": test_acc, "passes": cfg.passes, "history": history}

    return Recipe(net, opt, sched, lambda m: at_step(cfg, net, m, x_all, y_all, gen, acc), len(x_all), finish,
                  generators=(gen,))


AT_CLASSIFIER = register(Defense("at_classifier", "AT classifier", ATClassifierConfig, ATClassifier, at_recipe,
                                 cost=8.0))
