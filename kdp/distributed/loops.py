"""What runs inside Ray workers: the Train worker loop of a training stage, the task body of a
one-worker training stage, and the wrapper of every task. Both set torch's thread count to the CPUs Ray gave them and send
what the stage prints to its log file in the run directory, not to the driver's console.

The worker loop is the core's own recipe and epoch loop (`kdp.stages.common.train_recipe`)
plus the Ray lines: DDP, this rank's share of each epoch's batches, and a state store that
reports a Train checkpoint every epoch. Frozen classifier and teachers stay unwrapped. Rank 0
writes the stage's core checkpoint directory, exactly as the in-process executor does."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from kdp.checkpoint import load_state, save_state
from kdp.config import DataConfig, Runtime
from kdp.configio import unflatten
from kdp.data import load_cifar
from kdp.distributed.nodes import see_paths
from kdp.events import events_file
from kdp.tracking import board_files
from kdp.scheduler import publishing, state_path
from kdp.stages.drivers import RECIPES
from kdp.stages.common import epoch_logger, fit_local, save_recipe, train_recipe
from kdp.storage import publish_quietly

STATE = "state.pt"


def use_assigned_cpus() -> int:
    """torch threads = the CPUs Ray assigned to this task or worker (at least 1)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def captured(path: Path | None):
    """Send this process's stdout and stderr (file descriptors too) to `path` for the block."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1), os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@contextlib.contextmanager
def on_node(store, fetch, seen, log_file: str | None = None):
    """The body of every worker entry point, on whichever node it landed. With a bucket output
    (`store.remote`): the artifacts found in `fetch` are pulled into this node's mirror first,
    and after the body the stage's log and this process's events are published (quietly when
    the body raised: its error stays the one raised). With a directory: this node must see the
    paths `seen` (every node mounts the output root). Yields whether the store is a bucket; the
    body publishes what it made."""
    remote = store is not None and store.remote
    if remote:
        store.pull_all(fetch)
    else:
        see_paths([p for p in seen if p])
    ok = False
    try:
        yield remote
        ok = True
    finally:
        if remote and log_file:
            publish_log(store, Path(log_file), quietly=not ok)


def remote_call(fn, log_file: str | None, store, *args):
    """A task's body: threads from its CPUs, output to the stage's log file (under <run>/logs/),
    on a node (`on_node`: the artifacts among the arguments fetched first); a returned artifact
    is published."""
    use_assigned_cpus()
    with on_node(store, args, [Path(log_file).parent.parent] if log_file else [], log_file) as remote:
        with captured(Path(log_file) if log_file else None):
            result = fn(*args)
        if remote and store.holds(result):
            store.push(Path(result))
    return result


def publish_log(store, log_file: Path, quietly: bool = False) -> None:
    """A stage's log (<run>/logs/<stage>.log), this process's events and the stage's TensorBoard
    files, to the bucket; `quietly` while an error is on its way (a storage failure then is only
    logged)."""
    run_dir = log_file.parent.parent
    for path in (log_file, events_file(run_dir), *board_files(run_dir, log_file.stem)):
        publish_quietly(store, path) if quietly else store.push(path)


class TrainStates:
    """`fit`'s state store inside a Train worker (not the output store, kdp.storage): every rank
    reports each epoch (Train V2 needs all of them); rank 0 attaches the checkpoint. Loading
    reads the last reported one."""

    def __init__(self, rank: int):
        self.rank = rank

    def load(self) -> dict | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(Path(d) / STATE)

    def save(self, state: dict) -> None:
        metrics = dict(state["history"][-1])
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(Path(tmp) / STATE, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _stage_config(c: dict):
    """The stage's frozen config (pickled whole: its class travels by reference, wherever it is declared)."""
    return c["config"]


def _where(c: dict, rank: int = 0, world: int = 1):
    """The stage's epoch events, tagged with this node, its epoch lines in the stage's log, and
    its trackers (kdp.stages.common.epoch_logger)."""
    cfg = _stage_config(c)
    return epoch_logger(Path(c["run_dir"]), c["stage"], cfg.epochs, rank, world, echo=rank == 0,
                        mlflow=c["runtime"].get("mlflow"), config=cfg,
                        node=ray.get_runtime_context().get_node_id(), node_ip=ray.util.get_node_ip_address())


def train_task(c: dict, data, store=None) -> Path:
    """A one-worker training stage as a Ray task (inside remote_call): the in-process executor's
    loop, whose per-epoch state file beside the output lets a retry or a re-run resume it (on
    any node: with a bucket, the inputs and the state are fetched first, the state published
    every epoch)."""
    out, inputs = Path(c["out"]), list(c["inputs"].values())
    # a task's GPU is cuda:0 (CUDA_VISIBLE_DEVICES); a GPU resource without CUDA trains on the CPU
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    cfg = _stage_config(c)
    rt = Runtime(**{**c["runtime"], "device": device, "progress": False})
    with on_node(store, [Path(p) for p in inputs], [c["run_dir"], *inputs]) as remote:
        if remote:
            store.pull(state_path(out))  # a half-done attempt's, from any node
        with publishing(_where(c), store, state_path(out)) as hook:
            return fit_local(RECIPES[c["recipe"]], cfg, c["inputs"], data, out, rt, state_path(out), c["stage"], hook)


def train_loop(c: dict) -> None:
    """train_loop_per_worker of every training stage; `c` holds the stage config,
    the data config, the input and output paths and the recipe's name."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_assigned_cpus()
    store, inputs = c["store"], list(c["inputs"].values())
    with on_node(store, [Path(p) for p in inputs], [c["run_dir"], *inputs], c["log_file"]):  # every rank
        _train_worker(c, rank, world)
        if rank == 0:
            store.push(Path(c["out"]))


def _train_worker(c: dict, rank: int, world: int) -> None:
    """One rank of the stage: the recipe, DDP when there are peers, rank 0 saves the checkpoint."""
    # a GPU resource without CUDA (a simulated cluster): train on the CPU
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    cfg = _stage_config(c)
    rt = Runtime(**{**c["runtime"], "device": str(device), "progress": False})
    with captured(Path(c["log_file"])):
        data = load_cifar(**vars(unflatten(DataConfig, c["data"])))
        recipe = RECIPES[c["recipe"]](cfg, c["inputs"], data, device, rt, rank)
        model = ray.train.torch.prepare_model(recipe.model, move_to_device=False) if world > 1 else recipe.model
        history = train_recipe(cfg, recipe, model, rt, c["stage"], states=TrainStates(rank), rank=rank, world=world,
                               on_epoch=_where(c, rank, world))
        if rank == 0:
            save_recipe(Path(c["out"]), cfg, recipe, history, rt)
