"""Baseline purifiers for an honest Table 1, each trained by a stage into a checkpoint that
evaluation loads exactly like the student's (the modules are in kdp.models).

- `none`: no defense; the attacked classifier alone. Nothing to train (not a stage).
- `jpeg`: JPEG re-encoding (Dziugaite et al. 2016, "A study of the effect of JPG
  compression on adversarial images"; Guo et al. 2018, "Countering Adversarial Images
  using Input Transformations"). No parameters; its stage only writes the checkpoint.
- `nrp`: Naseer et al. 2020, "A Self-supervised Approach for Adversarial Robustness"
  (CVPR). Per batch: self-supervised perturbations (SSP) x' maximize the feature distortion
  ||F(x') - F(x)||^2 from a uniform random start (signed gradient ascent, L-inf ball);
  the purifier P minimizes w_feat ||F(P(x')) - F(x)||^2 + w_pixel ||P(x') - x||^2 plus a
  relativistic-average GAN loss against a critic, which is trained alongside it.
  Choices NRP leaves open here (kdp's pick): F is the frozen CIFAR classifier's last feature
  map (NRP used an ImageNet VGG); SSP is crafted on F alone, not through P (as the released
  ssp.py); step size ssp_eps/4 and ssp_steps steps; the loss weights and the critic's
  shape; the generator is a small residual net (NRPPurifier), not the 23-block RRDB.
- `soap`: Shi et al. 2021, "Online Adversarial Purification based on Self-supervised
  Learning" (ICLR). Its own classifier is trained jointly with auxiliary heads on noisy,
  augmented inputs: cross-entropy + aux_weight * auxiliary loss (denoising reconstruction,
  optionally rotation prediction). At test time, signed descent on the auxiliary loss
  inside an eps-ball purifies the input. Choices (kdp's pick): the trunk is a CIFAR ResNet
  of the defended classifier's kind, the decoder reads the last feature map, one radius
  instead of SOAP's per-image search over 11, the classifier recipe's SGD schedule.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.checkpoint import is_complete, save_checkpoint
from kdp.config import JpegConfig, NRPConfig, PipelineConfig, Runtime, SoapConfig
from kdp.configio import flatten
from kdp.data import Cifar, augment, to_float
from kdp.models import Critic, build_model, lookup
from kdp.provenance import provenance
from kdp.stages.common import Recipe, fit_local
from kdp.stages.purifier import PurifierData, load_frozen
from kdp.train import predict, seed_all


def baseline_spec(name: str, cfg) -> dict:
    """The registry spec (kdp.models.PURIFIERS) a baseline's checkpoint is rebuilt from."""
    kwargs = {"jpeg": lambda c: {"quality": c.quality},
              "nrp": lambda c: {"width": c.width, "blocks": c.blocks, "dynamic_std": c.dynamic_std},
              "soap": lambda c: {"arch": c.arch, "width": c.width, "aux": c.aux, "eps": c.eps, "steps": c.steps,
                                 "step_size": c.step_size, "random_start": c.random_start}}
    return {"kind": "purifier", "name": name, "kwargs": lookup(kwargs, name, "baseline")(cfg)}


def _build(name: str, cfg, device) -> nn.Module:
    spec = baseline_spec(name, cfg)
    return build_model(spec["kind"], spec["name"], **spec["kwargs"]).to(device)


def train_jpeg(cfg: JpegConfig, data: Cifar, out: Path, rt: Runtime = Runtime(), classifier_dir=None,
               state_path=None) -> Path:
    """JPEG has nothing to learn: write its checkpoint (spec + config) so it loads like the others."""
    out = Path(out)
    if is_complete(out, flatten(cfg)):
        return out
    model = _build("jpeg", cfg, torch.device("cpu"))
    return save_checkpoint(out, model, baseline_spec("jpeg", cfg), flatten(cfg), {"trained": False}, provenance(rt))


# ---------------------------------------------------------------- NRP

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
    pair = acc.module(NRPTraining(_build("nrp", cfg, device), Critic(cfg.critic_width).to(device)))
    opt = torch.optim.Adam(pair.parameters(), lr=cfg.lr)
    d = PurifierData(data, device)

    def finish(history):
        return pair.purifier, baseline_spec("nrp", cfg), {"final": history[-1] if history else {}, "history": history}

    return Recipe(pair, opt, None, lambda m: nrp_step(cfg, pair, d, classifier, acc), len(d), finish, ddp=False)


def train_nrp(cfg: NRPConfig, data: Cifar, out: Path, rt: Runtime = Runtime(), classifier_dir: Path | None = None,
              state_path: Path | None = None, on_epoch=None) -> Path:
    """Train (or resume, or skip) NRP against the frozen classifier's features."""
    return fit_local(nrp_recipe, cfg, {"classifier": classifier_dir}, data, out, rt, state_path, "nrp", on_epoch)


# ---------------------------------------------------------------- SOAP

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
    model = acc.module(_build("soap", cfg, device))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    x_all, y_all = data.train_x.to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def finish(history):
        test_acc = (predict(model.net, data.test_x, device) == data.test_y).float().mean().item()
        return model, baseline_spec("soap", cfg), {"test_acc_unpurified": test_acc, "history": history}

    return Recipe(model, opt, sched, lambda m: soap_step(cfg, model, x_all, y_all, gen, acc), len(x_all), finish,
                  ddp=False, generators=(gen,))


def train_soap(cfg: SoapConfig, data: Cifar, out: Path, rt: Runtime = Runtime(), classifier_dir=None,
               state_path: Path | None = None, on_epoch=None) -> Path:
    """Train (or resume, or skip) SOAP's own classifier with its auxiliary heads."""
    return fit_local(soap_recipe, cfg, {}, data, out, rt, state_path, "soap", on_epoch)


BASELINE_STAGES = {"jpeg": train_jpeg, "nrp": train_nrp, "soap": train_soap}


def train_baseline(name: str, cfg: PipelineConfig, data: Cifar, out: Path, rt: Runtime = Runtime(),
                   classifier_dir: Path | None = None, state_path: Path | None = None, on_epoch=None) -> Path:
    """Train baseline `name` with its config from the pipeline config (cfg.jpeg, cfg.nrp, cfg.soap)."""
    train = lookup(BASELINE_STAGES, name, "baseline")
    if name == "jpeg":
        return train(cfg.jpeg, data, out, rt, classifier_dir, state_path)
    return train(getattr(cfg, name), data, out, rt, classifier_dir, state_path, on_epoch)
