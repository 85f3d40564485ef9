"""How the Ray layer places work on a cluster (`ScaleConfig`), its flags, and how a job
connects to Ray. Importing this module does not import Ray."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from kdp.config import require, positive
from kdp.flags import add_dataclass_args, dataclass_from_args, env_seconds
from kdp.interrupt import reinstall
from kdp.distributed.netns import NETWORKS, rerun_inside, wanted
from kdp.distributed.ray_private import disable_auto_init
from kdp.errors import ConfigError, StorageError  # noqa: F401 (re-exported)


BACKENDS = ("auto", "nccl", "gloo")
ONE_WORKER = ("task", "train")


@dataclass(frozen=True)
class ScaleConfig:
    """How the distributed layer places work on a Ray cluster; not part of an experiment's identity."""
    num_workers: int = 1
    """Data-parallel workers per training stage. One is the default: spare GPUs run independent
    stages and sweep trials at once, which pays more than DDP for a 0.85M-parameter model."""
    use_gpu: bool = False
    """One GPU per worker and per task."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker and per task; torch uses that many threads."""
    gpus_per_worker: float = 1.0
    """GPUs per worker with --use-gpu (fractions pack several workers on one GPU)."""
    max_failures: int = 3
    """Restarts from the last checkpoint (of a Train worker group, or retries of a task) before a
    stage fails; -1: no limit."""
    keep_checkpoints: int = 2
    """Ray Train checkpoints kept per stage (the last k)."""
    eval_shard_size: int = 512
    """Test images per evaluation task (rounded up to the eval batch size)."""
    backend: str = "auto"
    """torch.distributed backend of the workers: auto (nccl with --use-gpu, else gloo), nccl or gloo."""
    one_worker: str = "task"
    """How a one-worker training stage runs: task (a Ray task in a reused worker process, resuming
    from its per-epoch state file) or train (a Ray Train run, as every data-parallel stage and a
    sweep trial's student are: a Train run's start-up per stage (docs/runs/ray_overhead-cpu2.json),
    for Train's own run records)."""
    network: str = "auto"
    """The network of a local Ray (no --address): private (a network namespace of its own: no
    port reachable from another machine, and no network for the run; kdp.distributed.netns),
    host (the machine's: Ray's core servers listen on every interface, behind Ray's token
    authentication) or auto (private when the run needs none: --out, --data-dir and --classifier
    on local disk, no GPU; and the system allows it)."""

    def __post_init__(self):
        positive(self, "num_workers", "cpus_per_worker", "keep_checkpoints", "eval_shard_size")
        require(self.max_failures >= -1, f"ScaleConfig.max_failures must be >= -1, got {self.max_failures}")
        require(not self.use_gpu or self.gpus_per_worker > 0,
               f"ScaleConfig.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")
        require(self.backend in BACKENDS, f"ScaleConfig.backend must be one of {', '.join(BACKENDS)}, "
               f"got {self.backend!r}")
        require(self.one_worker in ONE_WORKER, f"ScaleConfig.one_worker must be one of {', '.join(ONE_WORKER)}, "
               f"got {self.one_worker!r}")
        require(self.network in NETWORKS, f"ScaleConfig.network must be one of {', '.join(NETWORKS)}, "
               f"got {self.network!r}")
        require(self.backend != "nccl" or self.use_gpu, "ScaleConfig.backend nccl needs --use-gpu")
        require(not (self.torch_backend == "nccl" and self.num_workers > 1 and self.gpus_per_worker < 1),
               f"ScaleConfig.gpus_per_worker {self.gpus_per_worker:g} with num_workers {self.num_workers}: "
               "NCCL refuses two ranks on one GPU (use whole GPUs, one worker, or --backend gloo)")

    @property
    def torch_backend(self) -> str:
        """The backend workers use: nccl or gloo."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.use_gpu else "gloo"


def add_scale_args(p: argparse.ArgumentParser) -> None:
    """The cluster flags of jobs/pipeline.py, jobs/sweep.py and kdp sweep: ScaleConfig's fields,
    the address and the console's verbosity."""
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    add_dataclass_args(p, ScaleConfig)
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and every worker's output")


def scale_config(args: argparse.Namespace) -> ScaleConfig:
    return dataclass_from_args(ScaleConfig, args)


# Train's controller polls workers every 2 s by default, which dominates small stages; it and
# the other RAY_TRAIN_* settings below reach the controller and workers from the driver's env.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# a laptop is never preempted: no watcher actor per stage; no per-node Prometheus exporter (it binds
# every interface, unauthenticated, unless the node's IP is loopback, which ray.init rewrites; kdp
# reads its own events, never Ray's metrics). Ray's dashboard and autoscaler metrics servers have
# no such setting in 2.59/2.60: docs/object-storage.md says what a run on the host network exposes
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_enable_metrics_collection": "0"}


def isolate(address: str | None, scale: ScaleConfig, network_uses: list, rerun: list[str] | None) -> None:
    """Before a local Ray starts: re-run this command (`rerun`, its command line; None when
    called from Python, which never re-executes) in a private network namespace if
    `scale.network` asks for it (kdp.distributed.netns). Joining a cluster: nothing."""
    if address or os.environ.get("RAY_ADDRESS") or rerun is None:
        return
    if wanted(scale.network, network_uses, scale.use_gpu):
        rerun_inside(rerun)


CLUSTER_WAIT_S = 30.0  # KDP_CLUSTER_WAIT_S: how long a cluster named by --address may take to answer


def expect_cluster(address: str, wait_s: float = CLUSTER_WAIT_S) -> None:
    """One line naming the address when nothing listens on a `host:port` cluster address for
    wait_s seconds: ray.init would otherwise retry for many minutes, in C++ warnings, and
    `ray symmetric-run` exits 0 when its own head failed to start, so a job told where its
    cluster is must say it is not there. `auto` and `ray://` addresses are left to Ray."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return
    wait_s = env_seconds("KDP_CLUSTER_WAIT_S", wait_s)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"--address {address}: no Ray cluster answers there ({e.strerror or e} for "
                                  f"{wait_s:g} s); start it first (ray start --head, ray symmetric-run), or "
                                  "leave out --address and RAY_ADDRESS to start a local Ray") from None
        time.sleep(0.5)


def connect(address: str | None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a fresh local Ray sized to
    this machine: never whatever cluster /tmp/ray/ray_current_cluster last named. Quiet by
    default: no worker output or Ray INFO lines on the console (each stage logs to a file)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        expect_cluster(address)
    for k, v in {**TRAIN_ENV, **({} if address else LOCAL_ENV)}.items():
        os.environ.setdefault(k, v)
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # start-up notices (the dashboard URL, token auth) only with --verbose; warnings after it
    ray.init(address=address or "local", log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.ERROR)
    reinstall()  # ray.init took SIGTERM; a stoppable command takes it back
    # no implicit ray.init later: after an interrupted sweep's ray.shutdown, Tune's thread would
    # start a new local Ray (on the default ports) on its next call
    disable_auto_init()
    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)
