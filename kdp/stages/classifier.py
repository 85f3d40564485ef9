"""Stage 0: train the CIFAR ResNet classifier (SGD, momentum, weight decay, cosine), then
it is frozen for every later stage."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.config import ClassifierConfig, Runtime
from kdp.data import Cifar, augment, to_float
from kdp.models import build_model
from kdp.train import Recipe, predict, seed_all, sgd_cosine


def classifier_spec(cfg: ClassifierConfig) -> dict:
    return {"kind": "classifier", "name": cfg.arch, "kwargs": {"width": cfg.width}}


def build_classifier_training(cfg: ClassifierConfig, device: torch.device):
    """Model, optimizer and per-epoch cosine scheduler of the classifier recipe."""
    seed_all(cfg.seed)
    spec = classifier_spec(cfg)
    model = build_model(spec["kind"], spec["name"], **spec["kwargs"]).to(device)
    return (model, *sgd_cosine(model.parameters(), cfg))


def classifier_step(model, x_all, y_all, gen, acc: Accel):
    """Loss of one index batch: augmented images, cross-entropy."""
    def step(idx):
        xb = acc.images(augment(to_float(x_all[idx.to(x_all.device)]), gen))
        yb = y_all[idx.to(y_all.device)]
        with acc.autocast():
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        return {"loss": loss, "acc": (logits.argmax(1) == yb).float().mean()}
    return step


def classifier_recipe(cfg: ClassifierConfig, inputs: dict, data: Cifar, device: torch.device,
                      rt: Runtime, rank: int = 0) -> Recipe:
    """The classifier recipe; each data-parallel rank augments with its own generator."""
    model, opt, sched = build_classifier_training(cfg, device)
    acc = Accel.of(rt, device)
    model = acc.module(model)
    x_all, y_all = data.train_x.to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def finish(history):
        test_acc = (predict(model, data.test_x, device) == data.test_y).float().mean().item()
        return model, classifier_spec(cfg), {"test_acc": test_acc, "n_test": len(data.test_y), "history": history}

    return Recipe(model, opt, sched, lambda m: classifier_step(m, x_all, y_all, gen, acc), len(x_all), finish,
                  generators=(gen,))
