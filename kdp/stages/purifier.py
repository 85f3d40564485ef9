"""Stages 1 and 2: the AT and NT teachers (Eqs. 2-3) and the distilled student (Eqs. 4-6).

All three are the same ConvAutoencoder trained with Adam (paper: lr 0.01, batch 128).
The classifier and teachers are loaded frozen (eval mode, no gradients) and never
wrapped in DDP. No augmentation is used: the paper states none, and an AE is tied to
its clean image pixel for pixel.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kdp.accel import Accel
from kdp.checkpoint import load_frozen
from kdp.config import Runtime, StudentConfig, TeacherConfig
from kdp.data import Cifar, PurifierData
from kdp.losses import at_loss, nt_loss, student_loss
from kdp.models import build_model
from kdp.proxy import build_proxy
from kdp.stages.aes import load_training_aes
from kdp.train import Recipe, seed_all


def purifier_spec(cfg: TeacherConfig | StudentConfig) -> dict:
    return {"kind": "purifier", "name": "cae",
            "kwargs": {"depth": cfg.depth, "width": cfg.width, "head": cfg.head}}


def build_purifier_training(cfg: TeacherConfig | StudentConfig, acc: Accel):
    """Fresh purifier and its Adam optimizer (constant lr, as in the paper)."""
    seed_all(cfg.seed)
    spec = purifier_spec(cfg)
    model = acc.module(build_model(spec["kind"], spec["name"], **spec["kwargs"]))
    return model, torch.optim.Adam(model.parameters(), lr=cfg.lr)


def frozen_for_steps(path: Path, acc: Accel) -> torch.nn.Module:
    """A frozen model that a training step's loss calls: in the step's memory format, compiled if that is on."""
    return acc.compiled(acc.module(load_frozen(path, acc.device)))


def teacher_step(cfg: TeacherConfig, model, d: PurifierData, classifier, acc: Accel):
    """Loss of one batch: L_NT on clean images, or L_AT on AEs with the frozen classifier."""
    def step(idx):
        x, y, x_adv = d.batch(idx, acc)
        with acc.autocast():
            if cfg.kind == "nt":
                return nt_loss(model(x).float(), x)
            purified = model(x_adv)
            with torch.no_grad():
                logits_adv = classifier(x_adv)
            return at_loss(purified.float(), x, classifier(purified).float(), logits_adv.float(), y,
                           cfg.adv_score)
    return step


def student_step(cfg: StudentConfig, model, d: PurifierData, teachers: dict, classifier, acc: Accel):
    """Loss of one batch: beta * L_s + gamma * L_kd; the AT teacher sees x', NT sees x."""
    def step(idx):
        x, _, x_adv = d.batch(idx, acc)
        with acc.autocast():
            with torch.no_grad():
                t_outs = [teachers[k](x_adv if k == "at" else x).float() for k in cfg.teachers]
                t_logits = [classifier(t).float() for t in t_outs] if cfg.kd_space == "logits" else None
            out = model(x_adv).float()
            s_logits = classifier(out).float() if cfg.kd_space == "logits" else None
        return student_loss(out, x, t_outs, cfg.beta, cfg.gamma, cfg.kd_space, s_logits, t_logits)
    return step


def _purifier_recipe(cfg, model, opt, d: PurifierData, make_step, ae_dir) -> Recipe:
    def finish(history):
        return model, purifier_spec(cfg), {"final": history[-1] if history else {}, "history": history,
                                           "ae_dir": str(ae_dir) if ae_dir else None}
    return Recipe(model, opt, None, make_step, len(d), finish)


def teacher_recipe(cfg: TeacherConfig, inputs: dict, data: Cifar, device: torch.device, rt: Runtime,
                   rank: int = 0) -> Recipe:
    """AT: inputs 'classifier' and 'aes'; NT: none."""
    ae_dir = None
    if cfg.kind == "at":
        if inputs.get("classifier") is None or inputs.get("aes") is None:
            raise ValueError("the AT teacher needs classifier_dir and ae_dir")
        ae_dir = Path(inputs["aes"])
    acc = Accel.of(rt, device)
    classifier = frozen_for_steps(Path(inputs["classifier"]), acc) if cfg.kind == "at" else None
    d = PurifierData(data, device, None if ae_dir is None else load_training_aes(ae_dir))
    model, opt = build_purifier_training(cfg, acc)
    return _purifier_recipe(cfg, model, opt, d, lambda m: teacher_step(cfg, m, d, classifier, acc), ae_dir)


def student_recipe(cfg: StudentConfig, inputs: dict, data: Cifar, device: torch.device, rt: Runtime,
                   rank: int = 0) -> Recipe:
    """Inputs 'classifier', 'aes' and 'teacher_<k>' for each of cfg.teachers."""
    missing = [t for t in cfg.teachers if inputs.get(f"teacher_{t}") is None]
    if missing:
        raise ValueError(f"student {cfg.variant} needs teacher checkpoints for {missing}")
    acc = Accel.of(rt, device)
    teachers = {k: frozen_for_steps(Path(inputs[f"teacher_{k}"]), acc) for k in cfg.teachers}
    classifier = frozen_for_steps(Path(inputs["classifier"]), acc)
    d = PurifierData(data, device, load_training_aes(Path(inputs["aes"])))
    model, opt = build_purifier_training(cfg, acc)
    recipe = _purifier_recipe(cfg, model, opt, d,
                              lambda m: student_step(cfg, m, d, teachers, classifier, acc), inputs["aes"])
    if rank == 0:  # the proxy is rank 0's metric (the one Tune reads), of the unwrapped model
        recipe.proxy = build_proxy(cfg, model, classifier, data, Path(inputs["aes"]), device)
    return recipe
