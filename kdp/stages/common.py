"""Helpers every stage uses: the stage log, epoch lines, and the training
recipe that one process and a Ray Train worker both run."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from kdp.accel import Accel
from kdp.checkpoint import is_complete, save_checkpoint
from kdp.configio import flatten
from kdp.events import log_event
from kdp.provenance import provenance
from kdp.tracking import EpochBoard, MlflowRun
from kdp.train import Recipe, epoch_batches, fit, train_epoch
from kdp.accel import resolve_device


def train_recipe(cfg, recipe: Recipe, model: nn.Module, rt, desc: str, states=None, state_path: Path | None = None,
                 rank: int = 0, world: int = 1, on_epoch=None) -> list[dict]:
    """The resumable epoch loop of a recipe on this rank's share of each epoch's batches. The
    step calls `model` compiled when that is on (kdp.accel); a step that calls submodules
    directly (not `ddp`) runs them as they are."""
    acc = Accel.of(rt, next(recipe.model.parameters()).device)
    step = recipe.make_step(acc.compiled(model) if recipe.ddp else model)

    def epoch_fn(epoch):
        batches = epoch_batches(recipe.n, cfg.batch_size, cfg.seed, epoch, rank, world)
        metrics = train_epoch(model, recipe.optimizer, batches, step, desc=f"epoch {epoch + 1}", progress=rt.progress)
        return {**metrics, **(recipe.proxy() if recipe.proxy else {})}

    # random states are saved by rank 0 only: a one-worker resume is exact, a DDP one is not
    return fit(cfg.epochs, epoch_fn, recipe.model, recipe.optimizer, recipe.scheduler, state_path, desc,
               rt.progress, states=states, on_epoch=on_epoch, generators=recipe.generators, rng=world == 1)


def save_recipe(out: Path, cfg, recipe: Recipe, history: list[dict], rt) -> Path:
    """The stage's self-describing checkpoint directory, the same from every executor."""
    module, spec, metrics = recipe.finish(history)
    return save_checkpoint(out, module, spec, flatten(cfg), metrics, provenance(rt))


def fit_local(build, cfg, inputs: dict, data, out: Path, rt, state_path: Path | None = None, desc: str = "train",
              on_epoch=None) -> Path:
    """Build a recipe and train it in this process (resuming from state_path); skip a stage
    whose checkpoint is already finished with this config."""
    out = Path(out)
    if is_complete(out, flatten(cfg)):
        return out
    recipe = build(cfg, inputs, data, resolve_device(rt.device), rt)
    history = train_recipe(cfg, recipe, recipe.model, rt, desc, state_path=state_path, on_epoch=on_epoch)
    return save_recipe(out, cfg, recipe, history, rt)


def epoch_line(stage: str, epoch: int, epochs, metrics: dict) -> str:
    """'[stage] epoch 2/3 loss=0.1 (1.2s)': an epoch on the console and in a stage's log."""
    vals = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch", "seconds"))
    return f"[{stage}] epoch {epoch + 1}/{epochs} {vals} ({metrics.get('seconds', 0):.1f}s)"


def epoch_logger(run_dir: Path | None, stage: str, epochs: int, rank: int = 0, world: int = 1, echo: bool = False,
                 mlflow: str | None = None, config=None, **tags):
    """on_epoch hook: epoch_start / epoch_end events (the end one with the metrics) in the
    run's event log, and rank 0's metrics in TensorBoard files and, with `mlflow` (a tracking
    server), in an MLflow run with the stage's `config` as params (kdp.tracking); `tags` (e.g.
    the Ray node id) go into every event; `echo` also prints each finished epoch's line (a Ray
    worker's output goes to the stage's log file)."""
    where = {"epochs": epochs, "rank": rank, "world": world, **tags}
    boards = [EpochBoard(run_dir, stage, epochs)] if run_dir is not None and rank == 0 else []
    if boards and mlflow:
        boards.append(MlflowRun(mlflow, run_dir, stage, epochs, flatten(config) if config is not None else None))

    def on_epoch(epoch, metrics):
        if metrics is None:
            log_event(run_dir, stage, "epoch_start", epoch=epoch, **where)
        else:
            log_event(run_dir, stage, "epoch_end", epoch=epoch, metrics=metrics, **where)
            for board in boards:
                board(epoch, metrics)
            if echo:
                print(epoch_line(stage, epoch, epochs, metrics), flush=True)
    return on_epoch
