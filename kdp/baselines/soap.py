"""`soap`: Shi et al. 2021, "Online Adversarial Purification based on Self-supervised
Learning" (ICLR). Its own classifier is trained jointly with auxiliary heads on noisy,
augmented inputs: cross-entropy + aux_weight * auxiliary loss (denoising reconstruction,
optionally rotation prediction). At test time, signed descent on the auxiliary loss
inside an eps-ball purifies the input. Choices (kdp's pick): the trunk is a CIFAR ResNet
of the defended classifier's kind, the decoder reads the last feature map, one radius
instead of SOAP's per-image search over 11, the classifier recipe's SGD schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.config import ClassifierConfig, Runtime, one_of, nonnegative
from kdp.data import Cifar, augment, to_float
from kdp.defenses import Defense, register
from kdp.errors import ConfigError
from kdp.models import CLASSIFIERS, lookup, straight_through
from kdp.train import Recipe, predict, seed_all, sgd_cosine

SOAP_AUX = ("recon", "recon+rotation")


@dataclass(frozen=True)
class SoapConfig(ClassifierConfig):
    """Baseline: SOAP (Shi et al. 2021), its own classifier trained jointly with auxiliary
    self-supervised heads, purified at test time by descent on the auxiliary loss. Its trunk,
    optimizer and schedule are the classifier recipe's fields (kdp.config.ClassifierConfig; SOAP
    used ResNet-18 / WRN-28-10, kdp the defended classifier's architecture, like for like)."""
    seed: int = 1
    """Seed for init, shuffling, augmentation and noise."""
    aux: str = "recon"
    """Auxiliary task: 'recon' (denoising reconstruction) or 'recon+rotation'."""
    aux_weight: float = 1.0
    """Weight of the auxiliary loss beside the cross-entropy (SOAP's alpha; 1 in its code)."""
    noise_std: float = 0.1
    """Gaussian noise std on training inputs (SOAP's CIFAR code: 0.1); recon targets are clean."""
    eps: float = 8 / 255
    """Test-time purification radius (SOAP searches 0..40/255 per image; kdp uses one)."""
    steps: int = 5
    """Test-time signed-gradient steps (SOAP: 5)."""
    step_size: float = 4 / 255
    """Test-time step size (SOAP: 4/255)."""
    random_start: bool = False
    """Start purification at a uniform random point of the ball (randomized: EOT under full)."""

    def __post_init__(self):
        super().__post_init__()
        one_of(self.aux, SOAP_AUX, "SOAP auxiliary task")
        nonnegative(self, "aux_weight", "noise_std", "eps", "steps", "step_size")


class SoapNet(nn.Module):
    """SOAP's classifier (Shi et al. 2021): a CIFAR ResNet with auxiliary self-supervised heads
    on its last feature map: a decoder reconstructing the (denoised) input, and optionally a
    linear rotation classifier (0/90/180/270 degrees). forward() returns class logits."""

    def __init__(self, arch: str = "resnet20", width: int = 16, aux: str = "recon"):
        super().__init__()
        if aux not in SOAP_AUX:
            raise ConfigError(f"unknown SOAP auxiliary task {aux!r}; valid: {', '.join(SOAP_AUX)}")
        self.aux = aux
        self.net = lookup(CLASSIFIERS, arch, "classifier")(width=width)
        c, w = 4 * width, width
        self.decoder = nn.Sequential(  # 8x8 -> 32x32
            nn.ConvTranspose2d(c, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 3, 3, 1, 1), nn.Sigmoid())
        self.rotation = nn.Linear(c, 4) if "rotation" in aux else None

    def forward(self, x):
        return self.net(x)

    def losses(self, x, target=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits of x, per-image auxiliary loss): reconstruction MSE of `target`
        (default x) from x's features, plus, with rotation, the rotation cross-entropy
        averaged over the four rotations of x."""
        f = self.net.features(x)
        target = x if target is None else target
        aux = ((self.decoder(f) - target) ** 2).flatten(1).mean(1)
        if self.rotation is not None:
            rots = torch.cat([torch.rot90(x, k, (2, 3)) for k in range(4)])
            feats = torch.flatten(F.adaptive_avg_pool2d(self.net.features(rots), 1), 1)
            labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
            aux = aux + F.cross_entropy(self.rotation(feats), labels, reduction="none").view(4, -1).mean(0)
        return self.net.head(f), aux

    def aux_loss(self, x, target=None) -> torch.Tensor:
        return self.losses(x, target)[1]


class SoapPurifier(nn.Module):
    """SOAP's test-time purification: `steps` signed gradient-descent steps of size `step_size`
    on the auxiliary loss with respect to the input, projected into the L-inf ball of radius
    `eps` around it and into [0, 1]. It brings its own classifier (`own_classifier`).

    Gradients pass by BPDA (identity): the signed steps have zero derivative almost
    everywhere, so unrolling them would give the identity (masked by the projections) too.
    `random_start` draws the start uniformly in the ball, which makes the defense randomized.
    SOAP selects per image the best of 11 radii (0..40/255); kdp uses one radius.
    """
    backward = "bpda"

    def __init__(self, arch: str = "resnet20", width: int = 16, aux: str = "recon", eps: float = 8 / 255,
                 steps: int = 5, step_size: float = 4 / 255, random_start: bool = False):
        super().__init__()
        if eps < 0 or steps < 0 or step_size < 0:
            raise ConfigError(f"SOAP purification needs eps, steps, step_size >= 0; got {eps}, {steps}, {step_size}")
        self.net = SoapNet(arch, width, aux)
        self.eps, self.steps, self.step_size, self.random_start = eps, steps, step_size, random_start

    @property
    def own_classifier(self) -> nn.Module:
        return self.net

    @property
    def randomized(self) -> bool:
        return self.random_start and self.eps > 0

    def purify(self, x):
        x = x.detach()
        delta = (torch.rand_like(x) * 2 - 1) * self.eps if self.random_start else torch.zeros_like(x)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                loss = self.net.aux_loss((x + delta).clamp(0, 1), None).sum()
                (g,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() - self.step_size * g.sign()).clamp(-self.eps, self.eps)
        return (x + delta).clamp(0, 1)

    def forward(self, x):
        return straight_through(x, self.purify(x))


def soap_step(cfg: SoapConfig, model, x_all, y_all, gen: torch.Generator, acc: Accel):
    """One batch: augmented, noised images; cross-entropy + aux_weight * auxiliary loss,
    the reconstruction target being the clean (augmented) image."""
    def step(idx):
        x = acc.images(augment(to_float(x_all[idx.to(x_all.device)]), gen))
        y = y_all[idx.to(y_all.device)]
        noisy = (x + cfg.noise_std * torch.randn(x.shape, generator=gen).to(x.device)).clamp(0, 1)
        with acc.autocast():
            logits, aux = model.net.losses(noisy, target=x)
        ce = F.cross_entropy(logits.float(), y)
        aux = aux.float().mean()
        return {"loss": ce + cfg.aux_weight * aux, "ce": ce, "aux": aux,
                "acc": (logits.argmax(1) == y).float().mean()}
    return step


def soap_recipe(cfg: SoapConfig, inputs: dict, data: Cifar, device, rt: Runtime, rank: int = 0) -> Recipe:
    """SOAP's own classifier with its auxiliary heads (no inputs). The step calls the trunk's
    `losses`, not forward, so it trains on one worker (no DDP)."""
    seed_all(cfg.seed)
    acc = Accel.of(rt, device)
    model = acc.module(SoapPurifier(**SOAP.kwargs(cfg)).to(device))
    opt, sched = sgd_cosine(model.parameters(), cfg)
    x_all, y_all = data.train_x.to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def finish(history):
        test_acc = (predict(model.net, data.test_x, device) == data.test_y).float().mean().item()
        return model, SOAP.spec(cfg), {"test_acc_unpurified": test_acc, "history": history}

    return Recipe(model, opt, sched, lambda m: soap_step(cfg, model, x_all, y_all, gen, acc), len(x_all), finish,
                  ddp=False, generators=(gen,))


SOAP = register(Defense("soap", "SOAP", SoapConfig, SoapPurifier, soap_recipe, parallel=False, cost=3.0))
