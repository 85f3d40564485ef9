"""Stage 0: train the CIFAR ResNet classifier (SGD, momentum, weight decay, cosine), then
it is frozen for every later stage."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kdp.checkpoint import save_checkpoint
from kdp.config import ClassifierConfig, Runtime, flatten
from kdp.data import Cifar, augment, to_float
from kdp.models import build_model
from kdp.provenance import provenance
from kdp.stages.common import finished
from kdp.train import autocast, epoch_batches, fit, predict, resolve_device, seed_all, train_epoch


def classifier_spec(cfg: ClassifierConfig) -> dict:
    return {"kind": "classifier", "name": cfg.arch, "kwargs": {"width": cfg.width}}


def build_classifier_training(cfg: ClassifierConfig, device: torch.device):
    """Model, optimizer and per-epoch cosine scheduler of the classifier recipe."""
    seed_all(cfg.seed)
    spec = classifier_spec(cfg)
    model = build_model(spec["kind"], spec["name"], **spec["kwargs"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return model, opt, sched


def classifier_step(model, x_all, y_all, gen, rt: Runtime, device):
    """Loss of one index batch: augmented images, cross-entropy."""
    def step(idx):
        xb = augment(to_float(x_all[idx.to(x_all.device)]), gen)
        if rt.channels_last and device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y_all[idx.to(y_all.device)]
        with autocast(device, rt.bf16):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        return {"loss": loss, "acc": (logits.argmax(1) == yb).float().mean()}
    return step


def train_classifier(cfg: ClassifierConfig, data: Cifar, out: Path, rt: Runtime = Runtime(),
                     state_path: Path | None = None) -> Path:
    """Train (or resume, or skip if already done) the classifier; returns its checkpoint dir."""
    out = Path(out)
    if finished(out, flatten(cfg)):
        return out
    device = resolve_device(rt.device)
    model, opt, sched = build_classifier_training(cfg, device)
    if rt.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x_all, y_all = data.train_x.to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = classifier_step(model, x_all, y_all, gen, rt, device)

    def epoch_fn(epoch):
        batches = epoch_batches(len(x_all), cfg.batch_size, cfg.seed, epoch)
        return train_epoch(model, opt, batches, step, desc=f"epoch {epoch + 1}", progress=rt.progress)

    history = fit(cfg.epochs, epoch_fn, model, opt, sched, state_path, "classifier", rt.progress)
    test_acc = (predict(model, data.test_x, device) == data.test_y).float().mean().item()
    metrics = {"test_acc": test_acc, "n_test": len(data.test_y), "history": history}
    return save_checkpoint(out, model, classifier_spec(cfg), flatten(cfg), metrics, provenance(rt))
