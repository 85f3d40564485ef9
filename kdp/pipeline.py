"""The whole method: classifier -> training AEs -> AT and NT teachers -> students, beside the
baselines and the surrogate -> evaluation -> parquet. The stages are `kdp.graph.pipeline_graph`;
the executor decides where they run (`LocalExecutor`: this process, one at a time; the Ray
executor in kdp.distributed: a cluster, in parallel). Re-running the same run name resumes:
finished stages are skipped and a half-done stage continues from its last finished epoch.

Layout under the output root:
    cache/aes/<key>/            training AEs, shared by every run under this root
    cache/eval_aes/<key>/       classifier- and transfer-threat evaluation AEs, likewise
    <run>/config.json           the PipelineConfig
    <run>/given.json            outputs this run took from elsewhere (--classifier, a replicate's
                                classifier and surrogate): stage name -> directory
    <run>/events/*.jsonl        one line per stage start / skip / finish and per epoch, a file
                                per writing process (read them with kdp.events.read_events)
    <run>/classifier/, teacher_at/, teacher_nt/, student_<variant>/   checkpoints
    <run>/surrogate/, baseline_<jpeg|nrp|soap>/   the transfer surrogate and the baselines
    <run>/state/<stage>.pt      per-epoch training state of unfinished stages (in-process)
    <run>/logs/<stage>.log      what each stage printed (Ray executor)
    <run>/results.parquet       one row per (variant, attack, threat model)
The output root is a directory or a bucket (`s3://bucket/prefix`, kdp.storage: the same
layout, mirrored in node-local scratch), with either executor.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from kdp.checkpoint import StageConflict, filled, read_meta
from kdp.config import Runtime
from kdp.configio import replicate
from kdp.data import load_cifar
from kdp.files import read_json, write_json
from kdp.graph import pipeline_graph, pipeline_place
from kdp.interrupt import time_limit
from kdp.pipeline_config import PipelineConfig
from kdp.scheduler import LocalExecutor, Run, run_graph
from kdp.storage import LocalStorage, open_storage


GIVEN = "given.json"


def run_input(run_dir: str | Path, stage: str) -> Path:
    """Where a run's output of `stage` is: <run>/<stage>, or the directory given.json names."""
    run_dir = Path(run_dir)
    given = run_dir / GIVEN
    if not (run_dir / stage).is_dir() and given.is_file() and stage in read_json(given, GIVEN):
        return Path(read_json(given, GIVEN)[stage])
    return run_dir / stage


def record_config(path: Path, record: dict, what: str, hint: str, defaults: dict | None = None) -> Path:
    """Write `record` (JSON) at `path` unless the same is there already; refuse a different one
    (a key the recorded one lacks counts as its value in `defaults`: kdp.checkpoint.filled)."""
    record, defaults = json.loads(json.dumps(record)), json.loads(json.dumps(defaults))  # tuples as lists
    if path.exists() and filled(read_json(path, path.name), defaults) != record:
        raise StageConflict(f"{path}: {what} exists with another config; {hint}")
    write_json(path, record)
    return path


def prepare_run(cfg: PipelineConfig, out_root: Path, store=None) -> Path:
    """Create the run directory and record its config; refuse a different config under the same name."""
    run_dir = Path(out_root) / cfg.name
    store = store or LocalStorage(out_root)
    store.pull(run_dir / "config.json")
    store.push(record_config(run_dir / "config.json", dataclasses.asdict(cfg), f"run {cfg.name!r}",
                             "pick another --name", dataclasses.asdict(PipelineConfig())))
    return run_dir


def run_pipeline(cfg: PipelineConfig, out_root: str | Path, rt: Runtime = Runtime(),
                 classifier_dir: str | Path | None = None, log=print, executor=None,
                 reuse: dict[str, Path] | None = None) -> Path | str:
    """Run (or resume) every stage of `cfg` under out_root/<name>; returns the results parquet.
    `reuse`: finished outputs of another run to take as they are (stage name -> directory).
    `out_root` is a directory or a bucket URI (kdp.storage).
    Bad data, a bad --classifier, unusable storage or a conflicting run name fail before
    anything is written."""
    t_start = time.time()
    ex = executor if executor is not None else LocalExecutor()
    store = open_storage(out_root)
    store.preflight()
    out_root = store.root
    data = load_cifar(cfg.data.data_dir, cfg.data.n_train, cfg.data.n_test)
    cfg.eval.check_test_size(len(data.test_y))
    given = dict(reuse or {})
    if classifier_dir is not None:
        given["classifier"] = Path(classifier_dir).expanduser().resolve()
        read_meta(given["classifier"])
    run_dir = prepare_run(cfg, out_root, store)
    if given:
        write_json(run_dir / GIVEN, {k: str(v) for k, v in given.items()})
        store.push(run_dir / GIVEN)
    log(f"[data] {len(data.train_y)} train / {len(data.test_y)} test images from {data.source}")
    run = Run(cfg, data, rt, run_dir, pipeline_place(out_root, run_dir, data), graph=pipeline_graph(cfg),
              given=given, log=log, t_start=t_start, storage=out_root / "ray", eval_cache=out_root / "cache" / "eval_aes",
              store=store)
    with time_limit(rt.time_limit):
        return store.uri_of(run_graph(run, ex)["evaluate"])


def run_replicates(cfg: PipelineConfig, seeds: tuple[int, ...], out_root: str | Path, rt: Runtime = Runtime(),
                   classifier_dir: str | Path | None = None, scope: str = "purifiers", log=print,
                   executor=None) -> list[Path]:
    """One run per seed (`replicate`: <name>-seed<k>), one after the other; the classifier and
    surrogate of the first are reused by the others when their configs agree (scope
    'purifiers'), and the training AEs come from the shared cache. Returns the parquets."""
    runs = [replicate(cfg, s, scope) for s in seeds]  # every config is validated before any work
    with time_limit(rt.time_limit):  # one limit for the whole command
        return _replicates(runs, out_root, rt, classifier_dir, log, executor)


def _replicates(runs, out_root, rt, classifier_dir, log, executor) -> list[Path]:
    paths, first = [], None
    for r in runs:
        reuse = {}
        if first is not None:  # a stage whose config did not change with the seed: take the first run's
            done = open_storage(out_root).root / first.name
            reuse = {k: done / k for k in ("classifier", "surrogate") if getattr(r, k) == getattr(first, k)
                     and (done / k / "checkpoint.json").is_file() and not (k == "classifier" and classifier_dir)}
        log(f"[seeds] run {r.name} (seed {r.seed}, {len(paths) + 1}/{len(runs)})"
            + (f"; reusing {first.name}'s {' and '.join(reuse)}" if reuse else ""))
        paths.append(run_pipeline(r, out_root, rt, classifier_dir, log, executor, reuse))
        first = first or r
    return paths


def run(cfg: PipelineConfig, out: str | Path, rt: Runtime = Runtime(), seeds: tuple[int, ...] | None = None,
        seed_scope: str = "purifiers", classifier: str | Path | None = None, executor=None, log=print) -> list:
    """The pipeline as a library call, on plain values: run (or resume) `cfg` under `out` (a
    directory or a bucket URI), or with `seeds` one run per seed; in this process, or with
    `executor` (kdp.distributed.executor.RayExecutor) on Ray. Returns the results' paths."""
    if seeds is None:
        return [run_pipeline(cfg, out, rt, classifier, log, executor)]
    return run_replicates(cfg, seeds, out, rt, classifier, seed_scope, log, executor)
