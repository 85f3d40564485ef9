"""Ray Train worker loops. Each builds the core's model, optimizer and step function,
wraps the model for DDP, trains on this rank's share of every epoch's batches and reports
a checkpoint every epoch. Frozen classifier and teachers stay unwrapped."""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from kdp.checkpoint import load_state, save_state
from kdp.config import ClassifierConfig, DataConfig, Runtime, StudentConfig, TeacherConfig, unflatten
from kdp.data import load_cifar
from kdp.stages.classifier import build_classifier_training, classifier_step
from kdp.stages.common import log_stage
from kdp.stages.purifier import PurifierData, build_purifier_training, load_frozen, student_step, teacher_step
from kdp.train import epoch_batches, predict, train_epoch

STATE = "state.pt"
CONFIGS = {"classifier": ClassifierConfig, "teacher": TeacherConfig, "student": StudentConfig}


def _build_classifier(cfg, c, data, device, rt, rank):
    model, opt, sched = build_classifier_training(cfg, device)
    x, y = data.train_x.to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # each rank augments differently
    return model, opt, sched, lambda m: classifier_step(m, x, y, gen, rt, device)


def _build_teacher(cfg, c, data, device, rt, rank):
    model, opt = build_purifier_training(cfg, device, rt.channels_last)
    d = PurifierData(data, device, Path(c["ae_dir"]) if cfg.kind == "at" else None)
    clf = load_frozen(Path(c["classifier_dir"]), device) if cfg.kind == "at" else None
    return model, opt, None, lambda m: teacher_step(cfg, m, d, clf, device, rt)


def _build_student(cfg, c, data, device, rt, rank):
    model, opt = build_purifier_training(cfg, device, rt.channels_last)
    d = PurifierData(data, device, Path(c["ae_dir"]))
    clf = load_frozen(Path(c["classifier_dir"]), device)
    teachers = {k: load_frozen(Path(c["teacher_dirs"][k]), device) for k in cfg.teachers}
    return model, opt, None, lambda m: student_step(cfg, m, d, teachers, clf, device, rt)


BUILDERS = {"classifier": _build_classifier, "teacher": _build_teacher, "student": _build_student}


def _restore(model, opt, sched) -> tuple[int, list]:
    """Load the last reported checkpoint (after a worker failure or a resumed run)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        state = load_state(Path(d) / STATE)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None and state.get("scheduler"):
        sched.load_state_dict(state["scheduler"])
    return state["epoch"], list(state["history"])


def _report(model, opt, sched, epoch, history, metrics, rank) -> None:
    """Every rank reports (Train V2 needs all); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp) / STATE, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict() if sched is not None else {},
                                       "epoch": epoch, "history": history, "final": metrics})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop(c: dict) -> None:
    """train_loop_per_worker for every stage; `c` holds the flattened stage config and paths."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cfg = unflatten(CONFIGS[c["kind"]], c["cfg"])
    rt = Runtime(**{**c["runtime"], "device": str(device), "progress": False})
    data = load_cifar(**vars(unflatten(DataConfig, c["data"])))
    model, opt, sched, make_step = BUILDERS[c["kind"]](cfg, c, data, device, rt, rank)
    start, history = _restore(model, opt, sched)
    ddp = ray.train.torch.prepare_model(model)
    step = make_step(ddp)
    run_dir, stage = Path(c["run_dir"]), c["stage"]
    if start >= cfg.epochs:  # finished before the driver saw it: report once more
        _report(model, opt, sched, start, history, history[-1] if history else {}, rank)
        return
    for epoch in range(start, cfg.epochs):
        log_stage(run_dir, stage, "epoch_start", epoch=epoch, rank=rank, world=world)
        batches = epoch_batches(len(data.train_y), cfg.batch_size, cfg.seed, epoch, rank, world)
        metrics = {"epoch": epoch + 1, **train_epoch(ddp, opt, batches, step)}
        if sched is not None:
            sched.step()
        if c["kind"] == "classifier" and epoch + 1 == cfg.epochs and rank == 0:
            metrics["test_acc"] = (predict(model, data.test_x, device) == data.test_y).float().mean().item()
        history.append(metrics)
        log_stage(run_dir, stage, "epoch_end", epoch=epoch, rank=rank, world=world)
        if rank == 0:
            print(f"[{stage}] epoch {epoch + 1}/{cfg.epochs} " +
                  " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"), flush=True)
        _report(model, opt, sched, epoch + 1, history, metrics, rank)
