"""Ray Tune sweeps. Each trial is a Tune function trainable (holding 0.01 CPU) that runs the
pipeline's graph with the Ray executor: the shared classifier, AEs and teachers are made by
whichever trial needs them first (kdp.sweep.ensure; one-worker stages as Ray tasks), the
trial's student is a TorchTrainer (the Train V2 pattern) whose epochs are forwarded to Tune
(TuneReportCallback, so Tune's own logs and TensorBoard curves stay available), and its
evaluation runs as sharded Ray tasks. The trial's results become one parquet file; its
accuracies are its final Tune report.

Concurrency is bounded by the grid and the cluster at its largest (`cluster_capacity`): as
many trials in flight as its CPUs (or GPUs) fit one training worker group each, every trial
of the grid under an autoscaler that grows to what is queued, unless `max_concurrent` says
otherwise.
Resume: Tuner.restore on <out>/<sweep>/tune; finished trials are not re-run, and an
unfinished trial's student resumes its Ray Train run (its name is deterministic).
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch  # its module imports without optuna installed

from kdp.config import Runtime, ThreatModel
from kdp.pipeline_config import PipelineConfig
from kdp.configio import from_dict
from kdp.data import load_cifar
from kdp.distributed.config import ScaleConfig
from kdp.distributed.executor import RayExecutor
from kdp.distributed.locks import RayLocks
from kdp.distributed.nodes import check_shared_storage, cluster_capacity
from kdp import proxy
from kdp.files import read_json, write_json
from kdp.sweep import SweepConfig, prepare_sweep, record_stopped, run_trial, sweep_metric, trial_base
from kdp.sweep_space import KNOBS, Range
from kdp.bucket_io import why
from kdp.errors import ConfigError, NotFoundError, StorageError
from kdp.interrupt import in_thread
from kdp.storage import Storage, is_uri, open_storage

SAMPLERS = {"uniform": tune.uniform, "loguniform": tune.loguniform}
TUNE_DIR = "tune"
RUNGS = "asha-rungs.json"  # <out>/<sweep>/: StudentASHA's rungs, for --resume


def trial_executor(scale: ScaleConfig) -> RayExecutor:
    """The pipeline's Ray executor; the epochs of the trial's own stage (its student) go to Tune."""
    def callbacks(stage):
        if stage.shared:
            return []
        from ray.tune.integration.ray_train import TuneReportCallback
        return [TuneReportCallback()]
    return RayExecutor(scale, callbacks)


def trial_metrics(path: Path) -> dict:
    """A trial's final Tune report: accuracy per attack (classifier threat model) and per full attack."""
    rows = pq.read_table(path, columns=["attack", "threat_model", "accuracy"]).to_pylist()
    blind = ThreatModel.CLASSIFIER
    return {f"{'acc' if r['threat_model'] == blind else 'acc_' + r['threat_model']}/{r['attack']}": r["accuracy"]
            for r in rows}


def sweep_trial(params: dict, base: dict, store, scale: dict, rt: dict, share: bool,
                lock_timeout_s: float, locks: RayLocks | None) -> None:
    """The Tune trainable: one trial of the sweep (see kdp.sweep.run_trial)."""
    cfg = from_dict(PipelineConfig, base)
    trial_id = tune.get_context().get_trial_id()
    data = load_cifar(cfg.data.data_dir, cfg.data.n_train, cfg.data.n_test)
    path = run_trial(cfg, params, store, trial_id, trial_executor(ScaleConfig(**scale)), data, Runtime(**rt),
                     share, log=lambda *_: None, lock_timeout_s=lock_timeout_s,
                     **({"locker": locks.held} if locks is not None else {}))
    tune.report({**trial_metrics(path), "results_file": str(store.uri_of(path))})


def param_space(s: SweepConfig) -> dict:
    """Tune's search space: samplers for Ranges; value lists a grid (search grid), else a choice
    that random draws from and Optuna proposes from."""
    def dim(v):
        if isinstance(v, Range):
            return SAMPLERS[v.dist](v.low, v.high)
        return tune.grid_search(list(v)) if s.search == "grid" else tune.choice(list(v))
    return {k.param: dim(getattr(s, k.field)) for k in KNOBS}


class FinalResultOptuna(OptunaSearch):
    """Optuna told of a trial's final result only: its student's epochs reach Tune too
    (TuneReportCallback) without the metric, which OptunaSearch would read for pruning."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def searcher(s: SweepConfig, metric: str = ""):
    """Tune's search algorithm: None (grid and random: Tune's own variant generator), or Optuna's
    TPE learning from `metric` (its state is saved with the experiment, so --resume goes on from
    the same study)."""
    return FinalResultOptuna(metric=metric or None, mode=s.mode, seed=0) if s.search == "optuna" else None


class StudentASHA(ASHAScheduler):
    """ASHA on the students' per-epoch proxy (kdp.proxy). Its time is the student's own `epoch`,
    which a resumed student goes on counting (Tune's training_iteration starts again). A student's
    last epoch is never a stop: it finished, so it is evaluated. Its rungs are saved beside the
    sweep (`rungs`, a local path published to `store`) each time they change and read back on
    --resume: Tune restores no scheduler state (ray#30838)."""

    def __init__(self, s: SweepConfig, base: PipelineConfig, rungs: Path, store: Storage, rt: Runtime = Runtime()):
        epochs = min(st.epochs for st in base.students)
        super().__init__(time_attr="epoch", metric=proxy.METRIC, mode="max", max_t=epochs - 1, brackets=1,
                         grace_period=s.grace_epochs, reduction_factor=s.reduction_factor, stop_last_trials=False)
        self.last, self.rungs, self.store, self.loaded = epochs, Path(rungs), store, False
        self.base, self.rt = base, rt

    def _recorded(self) -> dict:
        return {str(m): dict(seen) for m, seen in self._brackets[0]._rungs}

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self.loaded:  # the first trial of this driver: rungs a stopped driver saved
            self.loaded = True
            if self.store.pull(self.rungs):
                saved = read_json(self.rungs, "ASHA rungs")
                for m, seen in self._brackets[0]._rungs:
                    seen.update(saved.get(str(m), {}))
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self.last:
            return TrialScheduler.CONTINUE
        before = self._recorded()
        action = super().on_trial_result(tune_controller, trial, result)
        if self._recorded() != before:
            write_json(self.rungs, self._recorded())
            self.store.push(self.rungs)
        if action == TrialScheduler.STOP:  # its row now: a trial restarted by --resume finds itself done
            record_stopped(self.base, trial.config, trial.trial_id, result, self.store, self.rt)
        return action


def scheduler(s: SweepConfig, base: PipelineConfig, store: Storage, rt: Runtime = Runtime()):
    """Tune's trial scheduler: None (FIFO: every trial to its end) or ASHA on the students' proxy."""
    if s.scheduler != "asha":
        return None
    return StudentASHA(s, base, store.root / s.name / RUNGS, store, rt)


def concurrency(s: SweepConfig, scale: ScaleConfig) -> int:
    """Trials in flight: the sweep's setting, else as many as the grid has and the cluster at
    its largest fits one training worker group each. An autoscaling cluster that starts with
    no workers grows as those trials' trainers queue (a trial itself holds 0.01 CPU)."""
    if s.max_concurrent:
        return s.max_concurrent
    res, n = cluster_capacity(), s.grid_size()
    if res is None:  # an autoscaler without a published maximum: all of them, it adds nodes as they queue
        return n
    if scale.use_gpu:
        fits = res.get("GPU", 0) // (scale.num_workers * scale.gpus_per_worker)
    else:
        fits = res.get("CPU", 0) // (scale.num_workers * scale.cpus_per_worker)
    return int(max(1, min(n, fits)))


def _trainable(s: SweepConfig, base: PipelineConfig, store, scale: ScaleConfig, rt: Runtime):
    # a bucket has no flock that every node sees: its shared artifacts are leased through Ray
    locks = RayLocks() if store.remote else None
    fn = tune.with_parameters(sweep_trial, base=dataclasses.asdict(base), store=store,
                              scale=dataclasses.asdict(scale), rt=dataclasses.asdict(rt), share=s.share,
                              lock_timeout_s=s.lock_timeout_s, locks=locks)
    return tune.with_resources(fn, {"cpu": 0.01})  # the driver only waits; workers hold the CPUs


def _tuner(s: SweepConfig, base: PipelineConfig, store, scale: ScaleConfig, trainable, resume: bool,
           rt: Runtime = Runtime()) -> tune.Tuner:
    """A new sweep's Tuner (its experiment state in <out>/<sweep>/tune), or the one there."""
    tune_dir = store.root / s.name / TUNE_DIR
    where = str(store.uri_of(tune_dir))
    if resume:
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
        if not tune.Tuner.can_restore(where):
            raise NotFoundError(f"{where}: no sweep to resume there")
        return tune.Tuner.restore(where, trainable=trainable, resume_errored=True)
    if store.exists(tune_dir):
        raise ConfigError(f"{where}: sweep {s.name!r} exists; pass --resume to continue it")
    prepare_sweep(s, base, store)
    # a trial's epochs reach Tune without the final metric (TuneReportCallback): not an error
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # the metric goes to the searcher alone: Tune refuses one in TuneConfig beside ASHA's own
    return tune.Tuner(trainable, param_space=param_space(s),
                      tune_config=tune.TuneConfig(num_samples=s.num_samples, max_concurrent_trials=concurrency(s, scale),
                                                  search_alg=searcher(s, sweep_metric(s, base)),
                                                  scheduler=scheduler(s, base, store, rt)),
                      run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(store.uri_of(tune_dir.parent)),
                                                failure_config=tune.FailureConfig(max_failures=1)))


@contextmanager
def tune_storage(where: str):
    """Tune's own reads and writes of a bucket (its experiment state): the store's error
    (pyarrow's OSError, raw) in one line naming the URI, as kdp's own store calls say it."""
    try:
        yield
    except OSError as e:
        if not is_uri(where) or isinstance(e, StorageError):
            raise
        raise StorageError(f"{where}: Tune could not use the store: {why(e)}") from None


def run_sweep(s: SweepConfig, base: PipelineConfig, out_root: str | Path | Storage, scale: ScaleConfig = ScaleConfig(),
              rt: Runtime = Runtime(), resume: bool = False, log=print) -> Path:
    """Run (or, with resume, continue) a sweep on the connected Ray cluster; returns its
    results partition, <out>/results/sweep_id=<name> (a directory, or its bucket URI).
    `out_root`: a directory every node mounts, or a bucket (kdp.storage) every node reaches, or
    its Storage (checked once: preflight passes a Storage by)."""
    store = open_storage(out_root)
    store.preflight()
    base = trial_base(s, base)
    trainable = _trainable(s, base, store, scale, rt)
    check_shared_storage(store)
    with tune_storage(str(store.uri_of(store.root / s.name / TUNE_DIR))):  # Tune's own I/O there
        tuner = _tuner(s, base, store, scale, trainable, resume, rt)
        log(f"[sweep] {s.name}: {s.grid_size()} trials, results under {store.uri_of(store.root / 'results')}")
        # off the main thread: Tune installs no Ctrl-C handler of its own (it would wait for a last
        # experiment checkpoint); kdp's stops at once and --resume restores Tune's periodic one
        grid = in_thread(tuner.fit)
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} of {len(grid)} trials failed; first: {grid.errors[0]}")
    return store.uri_of(store.root / "results" / f"sweep_id={s.name}")
