"""The Ray executor of `kdp.graph`: data-parallel training stages are Ray Train runs
(`TorchTrainer`), and so is a sweep trial's student (its epochs go to Tune); a one-worker
training stage is a Ray task by default (`ScaleConfig.one_worker`), since a Train run's start-up
(a controller and a worker process; docs/runs/ray_overhead-cpu2.json) buys nothing there. The
training AEs and the evaluation shards are Ray tasks; an untrained baseline's checkpoint and the
evaluation's fan-out run in the driver.
`run_graph` starts a stage when its inputs exist and `has_room` says the cluster fits it beside what this run already has in flight, so a 2-core machine never runs
more CPU-bound work than it has cores, while a cluster runs the independent stages (both
teachers, the surrogate, the baselines, the students) at the same time.

Checkpoints: a Train run reports one every epoch (the last `keep_checkpoints` kept under
<storage>/<run>-<stage>), and a failed worker group restarts from the last one (`max_failures`);
a task saves the in-process executor's state file every epoch, and Ray retries a task whose
worker or node died (`max_failures` times), which resumes from it. Rank 0 writes the stage's
core checkpoint directory, so re-running the job skips it; a half-done stage resumes from its
Train run (found by name) or its state file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from kdp.checkpoint import is_complete
from kdp.configio import flatten
from kdp.data import Cifar
from kdp.distributed.config import ScaleConfig
from kdp.distributed.loops import STATE, remote_call, train_loop, train_task
from kdp.distributed.nodes import cluster_capacity
from kdp.distributed.ray_private import quick_placement_group_cleanup, train_snapshot_name
from kdp.graph import Stage
from kdp.scheduler import Run, state_path
from kdp.stages.drivers import TASKS
from kdp.events import log_event
from kdp.stages.shards import shards


SNAPSHOT = train_snapshot_name()  # Ray Train V2's run state


class KdpTrainer(TorchTrainer):
    """A TorchTrainer whose placement-group cleaner answers a stop within ~3 s. Ray's default
    waits up to 12 s for the cleaner's State API poll (10 s timeout) at the end of every run,
    a large part of each stage's fixed cost on 2 cores. Train's own hook, overridden: a Ray that
    no longer calls it, or has no such cleaner (ray_private), keeps its default callbacks."""

    def _create_default_callbacks(self):
        return quick_placement_group_cleanup(super()._create_default_callbacks())


class RayExecutor:
    """Runs graph stages on the connected Ray cluster."""

    def __init__(self, scale: ScaleConfig = ScaleConfig(), callbacks=None):
        self.scale = scale
        self.callbacks = callbacks or (lambda stage: [])
        """stage -> Ray Train callbacks for its run (a Tune trial forwards the student's epochs)."""
        self._refs: dict[int, ray.ObjectRef] = {}
        self._cap: tuple = ()
        self._inflight: set = set()

    # ---- scheduling
    def workers(self, stage: Stage) -> int:
        return self.scale.num_workers if stage.kind == "train" and stage.parallel else 1

    def demand(self, stage: Stage) -> dict[str, float]:
        """Resources a stage holds while it runs (driver work holds none)."""
        if stage.kind == "driver":
            return {}
        n = self.workers(stage)
        need = {"CPU": n * self.scale.cpus_per_worker}
        if self.scale.use_gpu:
            need["GPU"] = n * self.scale.gpus_per_worker
        return need

    def has_room(self, stage: Stage, running: list[Stage]) -> bool:
        """Fits beside this run's stages in flight in the cluster at its largest (an autoscaler
        starts nodes for what is queued); with nothing in flight always start."""
        need = self.demand(stage)
        if not running or not need:
            return True
        total = self._capacity()
        if total is None:  # an autoscaler grows the cluster to what is queued
            return True
        for s in running:
            for k, v in self.demand(s).items():
                need[k] = need.get(k, 0) + v
        return all(v <= total.get(k, 0) + 1e-9 for k, v in need.items())

    def _capacity(self) -> dict[str, float] | None:
        """cluster_capacity(), asked at most every few seconds (the scheduler polls twice a second)."""
        if not self._cap or time.monotonic() - self._cap[0] > 5:
            self._cap = (time.monotonic(), cluster_capacity())
        return self._cap[1]

    def task(self, **options):
        """remote_call as a Ray task with this scale's resources. DEFAULT scheduling: a task
        started from a Tune trial must not be captured by the trial's tiny placement group (it
        could never fit there). A GPU task's worker exits after it (max_calls=1), so no CUDA
        state is left in a reused worker; Ray takes max_calls only in ray.remote, not options()."""
        gpu = self.scale.gpus_per_worker if self.scale.use_gpu else 0
        fn = ray.remote(max_calls=1)(remote_call) if gpu else ray.remote(remote_call)
        return fn.options(num_cpus=self.scale.cpus_per_worker, num_gpus=gpu, scheduling_strategy="DEFAULT", **options)

    def train_run(self, stage: Stage, out: Path, run: Run) -> bool:
        """A training stage is a Train run when data-parallel, when its epochs go to callbacks
        (Tune), when asked (one_worker='train'), or when it began as one (so it resumes)."""
        return (self.workers(stage) > 1 or bool(self.callbacks(stage)) or self.scale.one_worker == "train"
                or _began_as_train_run(out, run))

    # ---- running
    def partial(self, stage: Stage, out: Path, run: Run) -> bool:
        return _began_as_train_run(out, run) or state_path(out).exists()

    def fit(self, stage: Stage, inputs: dict, out: Path, run: Run) -> Path:
        if self.train_run(stage, out, run):
            return self._fit(stage, inputs, out, run)
        # one worker: a Ray task, retried where its worker or node died; resumes from its state file
        fn = self.task(max_retries=self.scale.max_failures)
        self._get([fn.remote(train_task, _log_file(run, stage.name), run.store,
                             _loop_config(stage, inputs, out, run), self._ref(run.data), run.store)])
        return out

    def call(self, stage: Stage, inputs: dict, out: Path, run: Run) -> Path:
        rt = dataclasses.replace(run.rt, progress=False)
        return self._get([self.task().remote(TASKS[stage.fn], _log_file(run, stage.name), run.store, stage.config,
                                             inputs, out, self._ref(run.data), rt)])[0]

    def _get(self, refs: list, each=None) -> list:
        """ray.get, with the refs known to cancel() while they run; each(i) as the i-th ends."""
        self._inflight.update(refs)
        try:
            left = dict(zip(refs, range(len(refs)))) if each else {}
            while left:
                ready, _ = ray.wait(list(left), num_returns=1)
                for r in ready:
                    ray.get(r)  # a failed task raises now, as ray.get(refs) does at its first error
                    each(left.pop(r))
            return ray.get(refs)
        finally:
            self._inflight.difference_update(refs)

    def cancel(self) -> None:
        """Ctrl-C / SIGTERM: force-cancel this executor's tasks in flight (their workers exit; a
        training task's last epoch is in its state file). Train runs end with the driver's Ray."""
        for ref in list(self._inflight):
            ray.cancel(ref, force=True, recursive=True)

    def eval_items(self, eval_cfg, n_test: int, surrogate: bool) -> list[tuple]:
        return shards(eval_cfg, n_test, self.scale.eval_shard_size, surrogate)

    def map(self, fn, args: list[tuple], log_file: str | None = None, store=None, progress=None) -> list:
        """The tasks' own output goes to log_file; `progress` hears of each as it ends (its lines,
        printed here, come from its thread: at least every 30 s however long a task runs)."""
        task = self.task()
        refs = [task.remote(fn, log_file, store, *(self._ref(a) for a in a_)) for a_ in args]
        return self._get(refs, None if progress is None else (lambda i: progress.done(args[i])))

    def _ref(self, obj):
        """Large inputs (the dataset) go to the object store once."""
        if not isinstance(obj, Cifar):
            return obj
        if id(obj) not in self._refs:
            self._refs[id(obj)] = ray.put(obj)
        return self._refs[id(obj)]

    def _trainer(self, stage: Stage, loop_config: dict, name: str, storage: str) -> TorchTrainer:
        s = self.scale
        resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
        return KdpTrainer(
            train_loop, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers if stage.parallel else 1,
                                                   use_gpu=s.use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend=s.torch_backend),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage, callbacks=list(self.callbacks(stage)),
                failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.keep_checkpoints)))

    def _fit(self, stage: Stage, inputs: dict, out: Path, run: Run) -> Path:
        """trainer.fit(), resuming the stage's Train run if one exists. Ray writes its run snapshot
        in place, so a driver killed mid-write can leave one that cannot be resumed: such a run
        is moved aside (logged) before fit() and the stage starts over. Any other failure is
        raised as it is, and the run is kept for the next try. With a bucket output, Train keeps
        its run in the bucket (each object one PUT: no half-written snapshot) and the checkpoint
        rank 0 published is fetched here."""
        loop_config = _loop_config(stage, inputs, out, run)
        name, storage, store = _run_name(out), run.storage, run.store
        broken = None if store.remote else snapshot_problem(storage / name)
        if broken is not None:
            aside = storage / f"{name}.broken-{int(time.time())}"
            os.rename(storage / name, aside)
            log_event(run.run_dir, stage.name, "resume_refused", error=broken, moved_to=str(aside))
            run.say(f"[{stage.name}] cannot resume ({broken}); starting over, old run kept at {aside}")
        self._trainer(stage, loop_config, name, str(store.uri_of(storage))).fit()
        store.pull(out)
        if not is_complete(out):
            raise RuntimeError(f"[{stage.name}] the Train run finished but wrote no checkpoint at {out}")
        return out


def snapshot_problem(run_path: Path) -> str | None:
    """Why the Train run at run_path cannot be resumed, or None (none there, or resumable): its
    checkpoint_manager_snapshot.json must parse and name checkpoints that exist with a state."""
    snap = run_path / SNAPSHOT
    if not snap.exists():
        return None  # no report yet: Train starts it from scratch
    try:
        state = json.loads(snap.read_text())
        names = [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
        latest = state.get("latest_checkpoint_result")
        names += [latest["checkpoint_dir_name"]] if latest else []
    except (ValueError, KeyError, TypeError) as e:
        return f"{snap} is unreadable ({type(e).__name__}: {e})"
    for n in names:
        if not (run_path / n / STATE).is_file():
            return f"{snap} names {n}, which has no {STATE}"
    return None


def _loop_config(stage: Stage, inputs: dict, out: Path, run: Run) -> dict:
    """What a training stage's worker needs, as plain values (Train's train_loop_config)."""
    return {"stage": stage.name, "recipe": stage.fn, "config": stage.config, "data": flatten(run.cfg.data),
            "runtime": dataclasses.asdict(run.rt), "run_dir": str(run.run_dir),
            "inputs": {k: str(v) for k, v in inputs.items()}, "out": str(out), "log_file": _log_file(run, stage.name),
            "store": run.store}


def _began_as_train_run(out: Path, run: Run) -> bool:
    return run.store.exists(run.storage / _run_name(out))


def _run_name(out: Path) -> str:
    """The Train run's name: unique per output directory, the same on every re-run (resume)."""
    return f"{out.parent.name}-{out.name}"


def _log_file(run: Run, stage: str) -> str:
    return str(run.run_dir / "logs" / f"{stage}.log")
