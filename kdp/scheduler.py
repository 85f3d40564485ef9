"""How a stage graph (kdp.graph) runs: one `Run`, the one scheduler every executor runs it with
(`run_graph`, `run_stage`), and one table from a stage's kind to what runs it (`RUNNERS`). An
executor supplies only placement: where a training stage fits (`fit`) and a task runs (`call`),
how much may run at once, and where the evaluation's shards go.

`run_graph` starts every stage whose inputs exist while the executor has room for it (the
in-process executor: one stage at a time; Ray: what the cluster fits), logs each stage once
(`ensure`), and prints one line per stage start, finish and training epoch. `kdp run`,
`jobs/pipeline.py` and every sweep trial go through it; no Ray is imported here.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from kdp.checkpoint import is_complete
from kdp.config import Runtime
from kdp.configio import flatten
from kdp.data import Cifar
from kdp.ensure import ensure
from kdp.events import EventTail, events_file
from kdp.graph import Stage
from kdp.interrupt import STOP
from kdp.locks import reading
from kdp.pipeline_config import PipelineConfig
from kdp.results import results_key
from kdp.stages.common import epoch_line, epoch_logger, fit_local
from kdp.stages.drivers import DRIVER, RECIPES, TASKS, evaluation_key
from kdp.stages.eval_cache import complete, intact
from kdp.tracking import board_files
from kdp.storage import LocalStorage, Storage, publish_quietly, publishing_each

STOP_GRACE_S = 5.0  # how long an interrupted run waits for its stages in flight to see STOP


@dataclass
class Run:
    """One execution of a graph: its config, data, where things go and who is running it."""
    cfg: PipelineConfig
    data: Cifar
    rt: Runtime
    run_dir: Path
    """The event log (events/), per-stage state files and logs live here."""
    place: Callable[[Stage, dict], Path]
    """(stage, inputs) -> its output path."""
    graph: list[Stage] = field(default_factory=list)
    given: dict = field(default_factory=dict)
    """Outputs that exist already (stage name -> path), e.g. --classifier."""
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)
    """Extra result columns (a sweep trial's)."""
    guard: Callable | None = None
    """(out, done, make, stage, resumed) -> out: serializes makers of a shared artifact (sweeps)."""
    storage: Path | None = None
    """Ray Train runs go under here (Ray executor)."""
    eval_cache: Path | None = None
    """The evaluation AE cache (kdp.stages.eval_cache); None: AEs are crafted every time."""
    store: Storage | None = None
    """The output store, where the output root lives (kdp.storage): artifacts are pulled before a
    stage and pushed after it. None: the run directory's filesystem (LocalStorage)."""
    t_start: float = field(default_factory=time.time)
    readers: list = field(default_factory=list)
    """Shared locks on the cache entries this run reads (kdp.locks.reading), released when it ends."""
    _events: EventTail | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.store = self.store or LocalStorage(self.run_dir)

    def say(self, msg: str) -> None:
        """One console line, after the epoch lines logged before it (stages print from threads)."""
        with self._lock:
            self._tail()
            self.log(msg)

    def tail(self) -> None:
        with self._lock:
            self._tail()

    def _tail(self) -> None:
        """Print each new epoch_end event of rank 0 as one progress line (unless rt.progress is off)."""
        self._events = self._events or EventTail(self.run_dir)
        for e in self._events.new():
            if e.get("status") == "epoch_end" and e.get("rank", 0) == 0 and self.rt.progress:
                self.log(epoch_line(e["stage"], e["epoch"], e.get("epochs", "?"), e.get("metrics", {})))


DONE = {  # is a stage's output there and made from what it follows from? One test per kind of output
    "checkpoint": lambda stage, out, inputs, run: is_complete(out, flatten(stage.config),
                                                              flatten(type(stage.config)())),
    "aes": lambda stage, out, inputs, run: complete(out) and intact(out),  # the AEs its meta recorded
    # results are kept while nothing they follow from changed (--rescore: never)
    "results": lambda stage, out, inputs, run: (not run.rt.rescore
                                                and results_key(out) == evaluation_key(stage, inputs, run)),
}


def is_done(stage: Stage, out: Path, inputs: dict, run: Run) -> bool:
    return DONE[stage.output](stage, out, inputs, run)


RUNNERS = {  # what makes a stage's output, by its kind (kdp.graph.KINDS); the executor says where
    "train": lambda stage, inputs, out, run, ex: ex.fit(stage, inputs, out, run),
    "task": lambda stage, inputs, out, run, ex: ex.call(stage, inputs, out, run),
    "driver": lambda stage, inputs, out, run, ex: DRIVER[stage.fn](stage, inputs, out, run, ex),
}


def run_stage(stage: Stage, inputs: dict, run: Run, ex) -> Path:
    """One stage, skipped when its output is finished, otherwise made by the executor. With an
    output root in a bucket, its output (and an unfinished stage's state) is pulled first and
    the output is published once made."""
    out, store = run.place(stage, inputs), run.store
    train = stage.kind == "train"  # only a training stage leaves a half-done attempt to resume
    if not store.pull(out) and train:
        store.pull(state_path(out))  # another node's

    def done() -> bool:
        store.pull(out)  # asked again after a sweep's lock: another node may have published it meanwhile
        return is_done(stage, out, inputs, run)

    def make() -> Path:
        return RUNNERS[stage.kind](stage, inputs, out, run, ex)

    say = (lambda msg: run.say(msg.replace(str(store.root), store.uri))) if store.remote else run.say

    def produce() -> Path:
        resumed = train and ex.partial(stage, out, run)
        if run.guard is not None:
            return run.guard(out, done, make, stage.name, resumed)
        return ensure(out, done, make, run.run_dir, stage.name, None, say, lock=False, skip="skipped",
                      resumed=resumed)
    try:
        made = produce()
        while stage.output == "aes":  # read until the run ends: `kdp cache` must not prune it meanwhile
            fd = reading(out.parent / f"{out.name}.lock")
            if complete(out):  # still there: a prune removes an entry whole
                run.readers.append(fd)
                break
            os.close(fd)  # a prune took it between its check and this lock: make it again
            made = produce()
        store.push(out)  # made here; made on another node, it is fetched for what reads it here
        if not Path(made).exists():
            store.pull(made)
    except BaseException:  # the stage's error or the Ctrl-C stays the one raised
        for path in (events_file(run.run_dir), *board_files(run.run_dir, stage.name)):
            publish_quietly(store, path, say)
        raise
    for path in (events_file(run.run_dir), *board_files(run.run_dir, stage.name)):
        store.push(path)
    return made


def run_graph(run: Run, ex) -> dict[str, Path]:
    """Start each stage once its inputs exist and the executor has room; returns every output.
    After the first failure nothing new starts; it is raised once the stages in flight end
    (their checkpoints are kept, so a re-run resumes). On Ctrl-C or SIGTERM (`kdp.interrupt`)
    the stages in flight are stopped, not waited for: in-process ones at their next batch, the
    executor's own work by its `cancel()`; their last epoch's state is kept."""
    outputs, pending, running = dict(run.given), [s for s in run.graph if s.name not in run.given], {}
    run.run_dir.mkdir(parents=True, exist_ok=True)  # every worker checks that it sees it
    run._events = run._events or EventTail(run.run_dir, from_now=True)  # the console: this run's epochs only
    error = None
    pool = ThreadPoolExecutor(max(1, len(pending)))
    try:
        while (pending and error is None) or running:
            for s in list(pending if error is None else []):
                if all(n in outputs for n in s.needs) and ex.has_room(s, list(running.values())):
                    pending.remove(s)
                    running[pool.submit(run_stage, s, {n: outputs[n] for n in s.needs}, run, ex)] = s
            if not running:
                raise RuntimeError(f"stages {[s.name for s in pending]} wait on inputs no stage makes")
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            run.tail()
            for f in done:
                s = running.pop(f)
                if f.exception() is not None:
                    error = error or f.exception()
                else:
                    outputs[s.name] = Path(f.result())
    except BaseException:  # Interrupted, KeyboardInterrupt: stop what is in flight, do not wait for it
        _stop(ex, pool, running)
        _release(run)
        raise
    pool.shutdown()
    _release(run)
    run.tail()
    if error is not None:
        raise error
    return outputs


def _release(run: Run) -> None:
    while run.readers:
        os.close(run.readers.pop())


def _stop(ex, pool: ThreadPoolExecutor, running: dict) -> None:
    """Stop the stages in flight: in-process ones see STOP at their next batch, the executor
    cancels its own (Ray tasks); wait a few seconds for them, never for a whole stage."""
    asked = STOP.is_set()  # by kdp.interrupt's handler; else (a bare KeyboardInterrupt) only for now
    STOP.set()
    ex.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    wait(running, timeout=STOP_GRACE_S)
    if not asked:
        STOP.clear()


def state_path(out: Path) -> Path:
    """The in-process per-epoch state of the stage writing `out` (beside it, so any process
    that takes the stage over resumes it)."""
    return out.parent / "state" / f"{out.name}.pt"


@contextmanager
def publishing(on_epoch, store, state: Path):
    """on_epoch, then the epoch's training state published (a bucket output: so that a stage
    killed here resumes on any node) from a thread of its own: training goes on while a push
    waits on the store (kdp.storage.Publisher)."""
    with publishing_each(store, state) as pub:
        if pub is None:
            yield on_epoch
            return

        def hook(epoch: int, metrics: dict | None) -> None:
            on_epoch(epoch, metrics)
            if metrics is not None:
                pub.request()
        yield hook


@runtime_checkable
class Executor(Protocol):
    """What run_graph needs from an executor: LocalExecutor below, kdp.distributed's RayExecutor."""

    def has_room(self, stage: Stage, running: list[Stage]) -> bool:
        """May `stage` start beside the stages in flight?"""

    def partial(self, stage: Stage, out: Path, run: Run) -> bool:
        """Is there a half-done attempt at training `stage` to resume?"""

    def fit(self, stage: Stage, inputs: dict, out: Path, run: Run) -> Path:
        """Make a training stage's checkpoint at `out`: its recipe (RECIPES[stage.fn]) fitted, resumably."""

    def call(self, stage: Stage, inputs: dict, out: Path, run: Run) -> Path:
        """Make a task stage's output at `out`: TASKS[stage.fn](config, inputs, out, data, rt)."""

    def eval_items(self, eval_cfg, n_test: int, surrogate: bool) -> list[tuple]:
        """The evaluation's shards: (threat model, attack, start, stop), None meaning all."""

    def map(self, fn, args: list[tuple], log_file: str | None = None, store=None, progress=None) -> list:
        """[fn(*a) for a in args], wherever the executor runs work (`store`: the output root's
        storage, whose artifacts among the args a node fetches first). `progress`
        (kdp.stages.progress.Progress) hears of each `a` done; an executor that runs fn in this
        process passes fn `progress.tick` as one more argument, so that each batch counts."""

    def cancel(self) -> None:
        """Stop the work in flight now (Ctrl-C, SIGTERM)."""


class LocalExecutor:
    """Every stage in this process, one at a time, in the graph's priority order."""

    def __init__(self):
        self.name = "local"

    def cancel(self) -> None:
        """Nothing to do: in-process stages stop at their next batch (kdp.interrupt.STOP)."""

    def has_room(self, stage: Stage, running: list[Stage]) -> bool:
        return not running

    def partial(self, stage: Stage, out: Path, run: Run) -> bool:
        return state_path(out).exists()

    def fit(self, stage: Stage, inputs: dict, out: Path, run: Run) -> Path:
        with publishing(epoch_logger(run.run_dir, stage.name, epochs=stage.config.epochs, mlflow=run.rt.mlflow,
                                     config=stage.config), run.store,
                        state_path(out)) as hook:
            return fit_local(RECIPES[stage.fn], stage.config, inputs, run.data, out, run.rt, state_path(out),
                             stage.name, hook)

    def call(self, stage: Stage, inputs: dict, out: Path, run: Run) -> Path:
        return TASKS[stage.fn](stage.config, inputs, out, run.data, run.rt)

    def eval_items(self, eval_cfg, n_test: int, surrogate: bool) -> list[tuple]:
        return [(None, None, 0, None)]  # one pass: clean predictions and crafted AEs shared

    def map(self, fn, args: list[tuple], log_file: str | None = None, store=None, progress=None) -> list:
        if progress is None:
            return [fn(*a) for a in args]
        out = []
        for a in args:
            out.append(fn(*a, progress.tick))
            progress.done(a)
        return out
