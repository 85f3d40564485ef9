"""`nrp`: Naseer et al. 2020, "A Self-supervised Approach for Adversarial Robustness"
(CVPR). Per batch: self-supervised perturbations (SSP) x' maximize the feature distortion
||F(x') - F(x)||^2 from a uniform random start (signed gradient ascent, L-inf ball);
the purifier P minimizes w_feat ||F(P(x')) - F(x)||^2 + w_pixel ||P(x') - x||^2 plus a
relativistic-average GAN loss against a critic, which is trained alongside it.
Choices NRP leaves open here (kdp's pick): F is the frozen CIFAR classifier's last feature
map (NRP used an ImageNet VGG); SSP is crafted on F alone, not through P (as the released
ssp.py); step size ssp_eps/4 and ssp_steps steps; the loss weights and the critic's
shape; the generator is a small residual net (NRPPurifier), not the 23-block RRDB.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.config import Runtime, nonnegative, positive
from kdp.data import Cifar, PurifierData
from kdp.defenses import Defense, register
from kdp.errors import ConfigError
from kdp.checkpoint import load_frozen
from kdp.train import Recipe, seed_all


@dataclass(frozen=True)
class NRPConfig:
    """Baseline: NRP (Naseer et al. 2020), trained on self-supervised perturbations (SSP)
    that maximize the frozen classifier's feature distortion; see kdp.baselines."""
    width: int = 64
    """Channels of the residual generator."""
    blocks: int = 6
    """Residual blocks of the generator."""
    critic_width: int = 32
    """Channels of the critic's first conv."""
    epochs: int = 30
    """Adam epochs over the training set."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 1e-4
    """Adam learning rate of generator and critic (ESRGAN / NRP: 1e-4)."""
    ssp_eps: float = 16 / 255
    """L-inf radius of SSP (NRP: 16/255)."""
    ssp_steps: int = 5
    """Signed-gradient SSP steps per batch, step size ssp_eps / 4, from a uniform random start."""
    w_feat: float = 1.0
    """Weight of the feature loss ||F(P(x')) - F(x)||^2."""
    w_pixel: float = 1.0
    """Weight of the pixel loss ||P(x') - x||^2."""
    w_adv: float = 5e-3
    """Weight of the relativistic critic loss (ESRGAN's 5e-3; NRP does not state it)."""
    dynamic_std: float = 0.0
    """NRP's dynamic inference: Gaussian noise std added before purifying (0: off, deterministic)."""
    seed: int = 0
    """Seed for init, shuffling and SSP starts."""

    def __post_init__(self):
        positive(self, "width", "critic_width", "epochs", "batch_size", "lr", "ssp_steps")
        nonnegative(self, "blocks", "ssp_eps", "w_feat", "w_pixel", "w_adv", "dynamic_std")


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class NRPPurifier(nn.Module):
    """NRP's purifier (Naseer et al. 2020) at CIFAR scale: a residual generator (conv, `blocks`
    residual blocks, conv) predicting a correction r; the output is clamp(x + r, 0, 1).

    NRP's released generators are ImageNet-sized (an RRDB net of 23 blocks, 14M parameters,
    or a 1.2M-parameter ResNet); kdp's is the ResNet kind, shrunk. `dynamic_std` > 0 is NRP's
    "dynamic inference": Gaussian noise added before purifying, which makes the defense
    randomized (the full threat model then attacks it with EOT).
    """

    def __init__(self, width: int = 64, blocks: int = 6, dynamic_std: float = 0.0):
        super().__init__()
        if width < 1 or blocks < 0 or dynamic_std < 0:
            raise ConfigError(f"NRPPurifier needs width >= 1, blocks >= 0, dynamic_std >= 0; "
                             f"got {width}, {blocks}, {dynamic_std}")
        self.dynamic_std = dynamic_std
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.ReLU(), *[ResBlock(width) for _ in range(blocks)],
                                  nn.Conv2d(width, 3, 3, 1, 1))

    @property
    def randomized(self) -> bool:
        return self.dynamic_std > 0

    def forward(self, x):
        if self.dynamic_std > 0:
            x = (x + self.dynamic_std * torch.randn_like(x)).clamp(0, 1)
        return (x + self.body(x)).clamp(0, 1)


class Critic(nn.Module):
    """NRP's critic (discriminator) at CIFAR scale: three strided conv blocks, one logit per image."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 4, 1, 0))

    def forward(self, x):
        return self.net(x).flatten()


class NRPTraining(nn.Module):
    """The purifier and its critic, trained together (one state for resuming)."""

    def __init__(self, purifier: nn.Module, critic: nn.Module):
        super().__init__()
        self.purifier, self.critic = purifier, critic


def ssp(features, x: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """NRP's self-supervised perturbation: maximize ||F(x') - F(x)||^2 in an L-inf ball."""
    target = features(x).detach()
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(((features(x_adv) - target) ** 2).sum(), x_adv)
        x_adv = x_adv.detach() + eps / 4 * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def ragan_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Relativistic average GAN loss that `real` looks more real than `fake` (ESRGAN's, as in NRP)."""
    bce = F.binary_cross_entropy_with_logits
    return (bce(real - fake.mean(), torch.ones_like(real)) + bce(fake - real.mean(), torch.zeros_like(fake))) / 2


@contextlib.contextmanager
def no_param_grads(module: nn.Module):
    """Record no gradient for module's parameters (input gradients still flow)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def nrp_step(cfg: NRPConfig, pair: NRPTraining, d: PurifierData, classifier, acc: Accel):
    """One batch: SSP, then the purifier's and the critic's losses summed; each term reaches
    only its own network's parameters, so one backward and one Adam step update both."""
    def step(idx):
        x, _, _ = d.batch(idx, acc)
        with acc.autocast():
            x_adv = ssp(classifier.features, x, cfg.ssp_eps, cfg.ssp_steps)
            out = pair.purifier(x_adv).float()
            feat = F.mse_loss(classifier.features(out).float(), classifier.features(x).float())
            pixel = F.mse_loss(out, x)
            real = pair.critic(x).float()
            with no_param_grads(pair.critic):
                g_adv = ragan_loss(pair.critic(out).float(), real.detach())
            d_loss = ragan_loss(real, pair.critic(out.detach()).float())
        loss = cfg.w_feat * feat + cfg.w_pixel * pixel + cfg.w_adv * g_adv + d_loss
        return {"loss": loss, "feat": feat, "pixel": pixel, "g_adv": g_adv, "d_loss": d_loss}
    return step


def nrp_recipe(cfg: NRPConfig, inputs: dict, data: Cifar, device, rt: Runtime, rank: int = 0) -> Recipe:
    """NRP against the frozen classifier's features (input 'classifier'). The step calls the
    purifier and critic directly, so it trains on one worker (no DDP)."""
    if inputs.get("classifier") is None:
        raise ValueError("NRP needs classifier_dir: its feature extractor is the frozen classifier")
    acc = Accel.of(rt, device)
    classifier = acc.module(load_frozen(Path(inputs["classifier"]), device))
    seed_all(cfg.seed)
    pair = acc.module(NRPTraining(NRPPurifier(**NRP.kwargs(cfg)).to(device), Critic(cfg.critic_width).to(device)))
    opt = torch.optim.Adam(pair.parameters(), lr=cfg.lr)
    d = PurifierData(data, device)

    def finish(history):
        return pair.purifier, NRP.spec(cfg), {"final": history[-1] if history else {}, "history": history}

    return Recipe(pair, opt, None, lambda m: nrp_step(cfg, pair, d, classifier, acc), len(d), finish, ddp=False)


NRP = register(Defense("nrp", "NRP", NRPConfig, NRPPurifier, nrp_recipe, needs=("classifier",), parallel=False,
                           cost=1.0))
