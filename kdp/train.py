"""Plain training machinery shared by all stages: devices, seeded batches, one epoch, and
a resumable epoch loop. The Ray layer runs the same `fit`, with a state store that reports
Ray Train checkpoints instead of writing a local state file."""
from __future__ import annotations

import random
from dataclasses import dataclass
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kdp.checkpoint import load_state, save_state
from kdp.interrupt import before, check
from kdp.errors import CheckpointError


@contextmanager
def evaluating(*models: nn.Module):
    """Models in eval mode inside the block, their own modes restored after (a training step's
    attack: batch norm uses its running statistics and does not update them)."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sgd_cosine(params, cfg) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """The classifier recipe's optimizer, from a kdp.config.ClassifierConfig (or a config that
    extends it): SGD with its momentum, Nesterov and weight decay, and a per-epoch cosine
    schedule from `lr` to zero over `epochs`."""
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)


def rng_state(generators: Iterable[torch.Generator] = ()) -> dict:
    """Every random state a training loop may draw from: torch's (CPU, CUDA), numpy's,
    Python's and the recipe's own generators; saved with each epoch for an exact resume."""
    key, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": random.getstate(), "generators": [g.get_state() for g in generators]}


def set_rng_state(state: dict, generators: Iterable[torch.Generator] = ()) -> None:
    """Restore what rng_state saved (CUDA's only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        raise CheckpointError(f"saved state has {len(state['generators'])} generator(s), the recipe {len(generators)}")
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, shuffle: bool = True) -> list[torch.Tensor]:
    """Index batches of one epoch for one data-parallel rank.

    The permutation depends only on (seed, epoch), so a resumed epoch sees the same
    order. Each rank takes batch_size // world_size indices per step and every rank gets
    the same number of steps (DDP needs that); the last partial batch is kept.
    """
    if shuffle:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
    else:
        perm = torch.arange(n)
    per_rank = max(1, batch_size // world_size)
    steps = -(-n // (per_rank * world_size))
    out = []
    for s in range(steps):
        chunk = perm[s * per_rank * world_size:(s + 1) * per_rank * world_size]
        mine = chunk[rank::world_size]
        out.append(mine if len(mine) else chunk[:1])
    return out


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable,
                step: Callable[[torch.Tensor], dict], desc: str = "", progress: bool = False) -> dict:
    """One pass: for each index batch, `step(idx)` returns a loss dict; minimize its "loss".
    Returns the mean of every entry over the epoch."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    # the per-batch bar only on a terminal; logs (Ray, CI) get the per-epoch bar alone
    for idx in tqdm(batches, desc=desc, leave=False, disable=not (progress and sys.stderr.isatty())):
        check()  # Ctrl-C / SIGTERM: stop here, the last epoch's state is kept
        out = step(idx)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * len(idx)
        count += len(idx)
    return {k: float(v) / max(count, 1) for k, v in sums.items()}


class StateFile:
    """Where `fit` keeps its per-epoch training state in one process: a file, atomically replaced."""

    def __init__(self, path: Path | None):
        self.path = path

    def load(self) -> dict | None:
        return load_state(self.path) if self.path else None

    def save(self, state: dict) -> None:
        if self.path is not None:
            save_state(self.path, state)


def fit(epochs: int, epoch_fn: Callable[[int], dict], model: nn.Module,
        optimizer: torch.optim.Optimizer, scheduler=None, state_path: Path | None = None,
        desc: str = "train", progress: bool = True, states=None,
        on_epoch: Callable[[int, dict], None] | None = None, generators: tuple = (),
        rng: bool = True) -> list[dict]:
    """Run epochs [start, epochs), saving model/optimizer/scheduler state after each one.

    The state goes to `states` (a state store: anything with load() and save(state); the Ray
    layer's reports a Train checkpoint) or, by default, to the file `state_path` (StateFile);
    if a saved state exists the loop resumes after its last finished epoch. With `rng`, every random state (`rng_state`:
    the global ones and `generators`) is saved too and restored on resume, so a resumed run
    ends where an uninterrupted one would. `on_epoch(epoch, metrics)` is called when an
    epoch starts (metrics None) and ends, for progress lines and events."""
    states = states if states is not None else StateFile(state_path)
    history: list[dict] = []
    start = 0
    state = states.load()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start, history = state["epoch"], list(state["history"])
        if rng and "rng" in state:
            set_rng_state(state["rng"], generators)
    bar = tqdm(range(start, epochs), desc=desc, initial=start, total=epochs,
               disable=not (progress and sys.stderr.isatty()))
    for epoch in bar:
        # a time-limited command stops here if this epoch, as long as the last one, would not fit
        before(f"{desc} epoch {epoch + 1}", history[-1]["seconds"] if history else 0.0)
        if on_epoch is not None:
            on_epoch(epoch, None)
        t0 = time.perf_counter()
        metrics = epoch_fn(epoch)
        if scheduler is not None:
            scheduler.step()
        metrics = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, **metrics}
        history.append(metrics)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k not in ("epoch",)})
        states.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "epoch": epoch + 1, "history": history, **({"rng": rng_state(generators)} if rng else {})})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return history


@torch.no_grad()
def predict(model: nn.Module, x_uint8_or_float: torch.Tensor, device: torch.device,
            batch_size: int = 512) -> torch.Tensor:
    """Predicted labels of a set of images (uint8 or float in [0, 1]) on `device`."""
    model.eval()
    preds = []
    for i in range(0, len(x_uint8_or_float), batch_size):
        xb = x_uint8_or_float[i:i + batch_size].to(device)
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        preds.append(model(xb).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


@dataclass
class Recipe:
    """Everything one training stage needs, built the same way in one process and in a Ray
    Train worker: the model and its optimizer, a step function and how to finish."""
    model: nn.Module
    """What the optimizer trains (and what DDP wraps, if `ddp`)."""
    optimizer: torch.optim.Optimizer
    """The stage's optimizer."""
    scheduler: object | None
    """A per-epoch LR scheduler, or None."""
    make_step: Callable[[nn.Module], Callable[[torch.Tensor], dict]]
    """(the model, possibly DDP-wrapped) -> step(index batch) -> loss dict with 'loss'."""
    n: int
    """Items per epoch (training images)."""
    finish: Callable[[list[dict]], tuple[nn.Module, dict, dict]]
    """history -> (module to save, its registry spec, checkpoint metrics)."""
    ddp: bool = True
    """False when the step calls submodules directly (DDP would not sync them, torch.compile would
    not see them): one worker only, eager."""
    generators: tuple = ()
    """The recipe's own torch Generators (augmentation, noise): saved and restored with each epoch."""
    proxy: Callable[[], dict] | None = None
    """() -> metrics of the model after an epoch (kdp.proxy), added to the epoch's; None: none."""
