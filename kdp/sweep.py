"""Sweeps over the method's knobs (the paper's Table 2 ablation and its choice of beta, gamma).

A sweep is a base PipelineConfig plus a search space (`SweepConfig`). Each trial is one
point: a value of each knob of kdp.sweep_space (teacher variant, beta, gamma, the training eps,
the KD softmax space, the replicate seed). A trial
only trains its student and evaluates it; everything it depends on is shared:

    <out>/<sweep>/sweep.json                      the SweepConfig and the base PipelineConfig
    <out>/<sweep>/shared/classifier-<key>/        trained once per sweep
    <out>/<sweep>/shared/teacher_nt-<key>/        once (NT does not depend on eps)
    <out>/<sweep>/shared/aes/<key>/               training AEs, once per eps
    <out>/<sweep>/shared/teacher_at-<key>/        once per eps
    <out>/<sweep>/shared/events/                  which trial made or reused what, when
    <out>/<sweep>/events/                         each trial's start, finish (or skip)
    <out>/<sweep>/trials/<trial_id>/student/      the trial's own student
    <out>/results/sweep_id=<sweep>/trial-<trial_id>-<uuid>.parquet   one file per trial

Keys hash the artifact's config and its inputs (data, classifier weights, AEs), so a
directory is reused only for an identical recipe; its checkpoint.json says what it is.
A trial is the pipeline's own stage graph (`kdp.graph`) with these places and a guard:
`ensure` makes sharing safe under concurrency: the first trial to need an artifact takes
an exclusive lock and makes it, the others block on the lock and then reuse it. A lock dies
with its process, and artifacts appear by rename, so a crash leaves nothing half-written.

Nothing here imports Ray: `run_trial` takes an executor (`kdp.scheduler.LocalExecutor`, or the
Ray one in kdp.distributed.executor).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

from kdp.files import read_json, write_json
from kdp.config import Runtime, require, check_name, ThreatModel
from kdp.pipeline_config import PipelineConfig
from kdp.configio import flatten, from_dict
from kdp.data import Cifar
from kdp.errors import ConfigError, DataError, NotFoundError
from kdp.events import events_file, log_event
from kdp.ensure import ensure
from kdp.graph import Stage, ae_entry, pipeline_graph, placer
from kdp.scheduler import Run, run_graph
from kdp.locks import held
from kdp.pipeline import record_config
from kdp import proxy
from kdp.provenance import provenance
from kdp.results import make_rows, unique_name, write_results
from kdp.storage import Storage, open_storage
from kdp.sweep_space import KNOBS, SCHEDULERS, SEARCHES, Range

@dataclass(frozen=True)
class _Sweep:
    """The search space of one sweep over its knobs (kdp.sweep_space.KNOBS, one field each,
    added below), and how trials are chosen from it (`search`)."""
    name: str = "sweep"
    """Sweep id: the directory under the output root and the results partition."""
    search: str = "grid"
    """How trials are chosen: grid (every combination of the knobs' values, repeated num_samples
    times; a range is drawn anew each time), random (num_samples trials, each knob drawn from its
    values or range) or optuna (num_samples trials, each proposed by Optuna's TPE from the
    finished trials' `metric`)."""
    metric: str = ""
    """The trial result that ranks trials (Optuna learns from it), as Tune names it: acc/<attack>
    (the classifier threat model) or acc_full/<attack>; empty: acc/ of the base config's first attack."""
    mode: str = "max"
    """Whether a larger `metric` is better (max) or a smaller (min)."""
    scheduler: str = "none"
    """Early stopping: none (every trial runs to its end) or asha (Tune's ASHA stops a trial whose
    student's per-epoch `proxy_acc` (kdp.proxy) falls behind the others' at a rung; its row then
    holds that proxy, with `stopped_epoch`)."""
    grace_epochs: int = 1
    """ASHA: epochs every student trains before it may be stopped (its first rung)."""
    reduction_factor: int = 2
    """ASHA: rungs at grace_epochs * reduction_factor**k epochs; a trial below the top
    1/reduction_factor of its rung is stopped."""
    proxy_n: int = 64
    """ASHA: test images (the first ones) of the per-epoch proxy; its threat model is the `metric`'s."""
    num_samples: int = 1
    """Trials: repeats of the grid (search grid), or the number of trials (random, optuna)."""
    max_concurrent: int = 0
    """Trials in flight at once; 0: as many as the cluster's CPUs fit training workers."""
    share: bool = True
    """Reuse the classifier, teachers and AEs across trials (False: the naive sweep, for benchmarks)."""
    lock_timeout_s: float = 24 * 3600.0
    """Longest wait for another trial making a shared artifact; then the trial fails naming it."""

    def __post_init__(self):
        check_name(self.name, "sweep")
        for k in KNOBS:
            object.__setattr__(self, k.field, k.parse(getattr(self, k.field)))
        require(self.search in SEARCHES, f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        require(self.mode in ("max", "min"), f"mode must be max or min, got {self.mode!r}")
        if self.search == "optuna":
            require_optuna()
        require(self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        require(self.grace_epochs >= 1, f"grace_epochs must be >= 1, got {self.grace_epochs}")
        require(self.reduction_factor >= 2, f"reduction_factor must be >= 2, got {self.reduction_factor}")
        require(self.proxy_n >= 1, f"proxy_n must be >= 1, got {self.proxy_n}")
        require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        require(self.max_concurrent >= 0, f"max_concurrent must be >= 0, got {self.max_concurrent}")
        require(self.lock_timeout_s > 0, f"lock_timeout_s must be > 0, got {self.lock_timeout_s}")

    def grid_size(self) -> int:
        """How many trials the sweep runs."""
        n = self.num_samples
        if self.search != "grid":
            return n
        for k in KNOBS:
            v = getattr(self, k.field)
            n *= 1 if isinstance(v, Range) else len(v)
        return n


# one field per knob, `<field>: a tuple of values (or a Range)`, its default the knob's grid
SweepConfig = make_dataclass(
    "SweepConfig", [(k.field, tuple | Range, field(default=k.default, metadata={"doc": k.doc})) for k in KNOBS],
    bases=(_Sweep,), frozen=True, namespace={"__doc__": _Sweep.__doc__, "__module__": __name__})


def require_optuna() -> None:
    """`search: optuna` needs the optuna package: one line before any work if it is missing."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("--search optuna needs Optuna: pip install optuna (or kdp[optuna])") from None


def sweep_metric(s: SweepConfig, base: PipelineConfig) -> str:
    """The trial result trials are ranked by (trial_metrics' names), checked against what a trial reports."""
    attacks = ("clean", *base.eval.attacks, "worst-case")
    reported = [f"acc/{a}" for a in attacks] + [f"acc_{tm}/{a}" for tm in base.eval.threat_models
                                                if tm not in (ThreatModel.CLASSIFIER, ThreatModel.TRANSFER)
                                                for a in attacks]
    metric = s.metric or f"acc/{base.eval.attacks[0]}"
    if metric not in reported:
        raise ConfigError(f"--metric {metric}: not a result a trial reports; valid: {', '.join(reported)}")
    return metric


def trial_base(s: SweepConfig, base: PipelineConfig) -> PipelineConfig:
    """The base config every trial derives from: the sweep's name, and under ASHA each student
    measuring the proxy (kdp.proxy) under the `metric`'s threat model. Checks that ASHA has a
    rung to stop a student at before its last epoch."""
    base = dataclasses.replace(base, name=s.name)
    if s.scheduler != "asha":
        return base
    epochs = min((st.epochs for st in base.students), default=0)
    if s.grace_epochs >= epochs:
        raise ConfigError(f"--grace-epochs {s.grace_epochs}: ASHA needs it below the students' epochs ({epochs}), "
                          "else no trial can be stopped")
    threat = ThreatModel.FULL if sweep_metric(s, base).startswith(f"acc_{ThreatModel.FULL}/") else ThreatModel.CLASSIFIER
    n = min(s.proxy_n, base.data.n_test or s.proxy_n)  # a run of fewer test images: all of them
    students = tuple(dataclasses.replace(st, proxy_n=n, proxy_threat=threat.value) for st in base.students)
    return dataclasses.replace(base, students=students)


def sweep_from_dict(d: dict, **overrides) -> SweepConfig:
    """A SweepConfig from a YAML mapping (unknown keys are errors), then CLI overrides."""
    valid = [f.name for f in dataclasses.fields(SweepConfig)]
    merged = {**(d or {}), **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(merged) - set(valid))
    require(not unknown, f"unknown sweep key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return SweepConfig(**merged)


def load_sweep_file(path: str | Path, **overrides) -> SweepConfig:
    """Read a sweep YAML file (see jobs/sweep.yaml for the format)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such sweep file")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    require(d is None or isinstance(d, dict), f"{path}: expected a mapping of sweep keys")
    return sweep_from_dict(d, **overrides)


def sweep_to_dict(s: SweepConfig) -> dict:
    return {**dataclasses.asdict(s), **{k.field: k.to_json(getattr(s, k.field)) for k in KNOBS}}


# ---- one trial ---------------------------------------------------------------------------

def trial_config(base: PipelineConfig, params: dict, trial_id: str) -> PipelineConfig:
    """The PipelineConfig of one trial: each knob's value applied (a missing one takes its
    default's first value). A trial evaluates its own purifier only: no baselines, and no
    `transfer` threat model (a sweep trains no surrogate; `kdp run` gives the whole Table 1)."""
    cfg = base
    for k in KNOBS:
        cfg = k.apply(cfg, k.type(params.get(k.param, k.default[0])))
    threats = tuple(t for t in base.eval.threat_models if t != ThreatModel.TRANSFER)
    return dataclasses.replace(cfg, name=f"{base.name}-{trial_id}", baselines=(),
                               eval=dataclasses.replace(cfg.eval, threat_models=threats))


def trial_columns(params: dict, trial_id: str) -> dict:
    """The trial's results columns: its id and `sweep.<param>` of every knob."""
    return {"trial_id": trial_id, **{f"sweep.{k.param}": k.type(params.get(k.param, k.default[0])) for k in KNOBS}}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shared_root(sweep_dir: Path, trial_id: str, share: bool) -> Path:
    """Where a trial finds shared artifacts: one place per sweep, or its own (naive sweep)."""
    return sweep_dir / "shared" if share else sweep_dir / "trials" / trial_id / "own"


def trial_place(root: Path, trial_dir: Path, data: Cifar, results_file: Path):
    """Where a trial's stages write: shared artifacts keyed by their config and inputs, the
    trial's own stage (its student) in the trial's directory, the results in the sweep's partition."""
    dkey = data.fingerprint()

    def checkpoint(stage: Stage, inputs: dict) -> Path:
        if not stage.shared:
            return trial_dir / "student"
        upstream = Path(inputs["aes"]).name if "aes" in inputs else dkey
        return root / f"{stage.name}-{_key(flatten(stage.config), upstream)}"
    return placer({"checkpoint": checkpoint, "aes": ae_entry(root / "aes", data),
                   "results": lambda stage, inputs: results_file})


def trial_guard(root: Path, trial_dir: Path, who: str, log, lock_timeout_s: float | None = None,
                store=None, locker=held):
    """Shared artifacts are made under a lock (`locker`) by the first trial that needs them and
    reused by the others (logged in <root>/events/, published to a bucket `store`); the trial's
    own stages need no lock."""
    def guard(out, done, make, stage, resumed):
        own = not out.is_relative_to(root)
        try:
            return ensure(out, done, make, trial_dir if own else root, stage, who, log, lock=not own,
                          resumed=resumed, lock_timeout_s=lock_timeout_s, locker=locker)
        finally:
            if store is not None and not own:
                store.push(events_file(root))
    return guard


def trial_results(results_root: Path, sweep: str, trial_id: str) -> list[Path]:
    return sorted((results_root / f"sweep_id={sweep}").glob(f"trial-{trial_id}-*.parquet"))


def run_trial(base: PipelineConfig, params: dict, out_root: str | Path, trial_id: str, ex, data: Cifar,
              rt: Runtime = Runtime(), share: bool = True, log=print, lock_timeout_s: float | None = None,
              locker=held) -> Path:
    """One trial through the pipeline's graph with executor `ex`: train its student (reusing
    shared inputs, waiting at most lock_timeout_s for another trial making one, under `locker`)
    and write its results file. A trial whose results file exists is done: it is returned
    untouched. `out_root` is a directory or a bucket URI (kdp.storage; then `locker` must
    reach every node: kdp.distributed.locks)."""
    store = open_storage(out_root)
    sweep_dir, results_root = store.root / base.name, store.root / "results"
    store.pull_tree(results_root / f"sweep_id={base.name}")
    done = trial_results(results_root, base.name, trial_id)
    if done:  # finished before a crash hid it from Tune: keep its file, redo nothing
        log_event(sweep_dir, "trial", "skipped", by=trial_id, path=str(done[0]))
        log(f"[trial {trial_id}] results exist: {done[0]}")
        return done[0]
    t0 = time.time()
    log_event(sweep_dir, "trial", "started", by=trial_id, params=params)
    store.push(events_file(sweep_dir))  # a bucket's log shows the trials in flight, not only the finished
    cfg = trial_config(base, params, trial_id)
    variant = cfg.students[0].variant if cfg.students else "at_teacher"
    root, trial_dir = shared_root(sweep_dir, trial_id, share), sweep_dir / "trials" / trial_id
    results = results_root / f"sweep_id={base.name}" / unique_name(f"trial-{trial_id}")
    run = Run(cfg, data, rt, trial_dir, trial_place(root, trial_dir, data, results),
              graph=pipeline_graph(cfg, evaluated=(variant,)), log=log, extra=trial_columns(params, trial_id),
              guard=trial_guard(root, trial_dir, trial_id, log, lock_timeout_s, store, locker),
              storage=sweep_dir / "ray", t_start=t0, eval_cache=root / "eval_aes", store=store)
    outputs = run_graph(run, ex)
    write_json(trial_dir / "trial.json", {"trial_id": trial_id, "params": params, "inputs": {
        k: str(v) for k, v in outputs.items() if k != "evaluate"}, "config": json.loads(json.dumps(
            dataclasses.asdict(cfg)))})
    log_event(sweep_dir, "trial", "finished", by=trial_id, path=str(outputs["evaluate"]), seconds=time.time() - t0)
    for path in (trial_dir / "trial.json", events_file(sweep_dir)):
        store.push(path)
    return outputs["evaluate"]


def record_stopped(base: PipelineConfig, params: dict, trial_id: str, last: dict, out_root, rt: Runtime = Runtime()):
    """The results file of a trial that early stopping ended: one row holding its student's last
    proxy (kdp.proxy; not an evaluation) and `stopped_epoch`, so the trial counts as done and
    --resume leaves it stopped. A trial whose results file exists is left as it is (None)."""
    store = open_storage(out_root)
    results_root = store.root / "results"
    store.pull_tree(results_root / f"sweep_id={base.name}")
    if trial_results(results_root, base.name, trial_id):
        return None
    cfg = trial_config(base, params, trial_id)
    student = cfg.students[0]
    n = student.proxy_n  # kdp.proxy refuses more than the test set
    row = {"variant": student.variant, "attack": proxy.ATTACK, "threat_model": student.proxy_threat, "n": n,
           "correct": round(last[proxy.METRIC] * n), "accuracy": last[proxy.METRIC], "first": 0,
           **provenance(rt)}
    extra = {**trial_columns(params, trial_id), "stopped_epoch": int(last["epoch"])}
    path = results_root / f"sweep_id={base.name}" / unique_name(f"trial-{trial_id}")
    write_results(make_rows(cfg, {student.variant: student}, [row], extra), path)
    log_event(store.root / base.name, "trial", "stopped", by=trial_id, epoch=int(last["epoch"]), path=str(path))
    for p in (path, events_file(store.root / base.name)):
        store.push(p)
    return path


def prepare_sweep(sweep: SweepConfig, base: PipelineConfig, out_root: str | Path) -> Path:
    """Record sweep.json (in a bucket too); refuse a different sweep under the same name."""
    record = {"sweep": sweep_to_dict(sweep), "base": dataclasses.asdict(base)}
    store = open_storage(out_root)
    path = store.root / sweep.name / "sweep.json"
    store.pull(path)
    record_config(path, record, f"sweep {sweep.name!r}", "use --resume to continue it or pick another --name",
                  {"base": dataclasses.asdict(PipelineConfig())})
    store.push(path)
    return path


def sweep_exists(out_root: str | Path | Storage, name: str) -> bool:
    store = open_storage(out_root)
    return store.exists(store.root / name / "sweep.json")


def load_sweep_record(out_root: str | Path | Storage, name: str) -> tuple[SweepConfig, PipelineConfig]:
    """The SweepConfig and base PipelineConfig a sweep was started with (for --resume)."""
    store = open_storage(out_root)
    path = store.root / name / "sweep.json"
    if not store.pull(path):
        raise NotFoundError(f"{store.uri_of(path)}: no sweep {name!r} under {store.uri}")
    record = read_json(path, "sweep.json")
    return sweep_from_dict(record["sweep"]), from_dict(PipelineConfig, record["base"])
