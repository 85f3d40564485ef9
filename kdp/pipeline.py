"""The whole method in one process: classifier -> training AEs -> AT and NT teachers ->
students -> evaluation -> parquet. Re-running the same run name resumes: finished stages
are skipped and a half-done stage continues from its last finished epoch.

Layout under the output root:
    cache/aes/<key>/            training AEs, shared by every run under this root
    <run>/config.json           the PipelineConfig
    <run>/stages.jsonl          one line per stage start / skip / finish
    <run>/classifier/, teacher_at/, teacher_nt/, student_<variant>/   checkpoints
    <run>/surrogate/, baseline_<jpeg|nrp|soap>/   the transfer surrogate and the baselines
    <run>/state/<stage>.pt      per-epoch training state of unfinished stages
    <run>/results.parquet       one row per (variant, attack, threat model)
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from kdp.checkpoint import read_json, read_meta, write_json
from kdp.config import PipelineConfig, Runtime, flatten
from kdp.data import load_cifar
from kdp.provenance import provenance
from kdp.results import make_rows, write_results
from kdp.stages import evaluate, make_training_aes, train_classifier, train_student, train_teacher
from kdp.stages.baselines import train_baseline
from kdp.stages.common import StageConflict, finished, log_stage


def run_dirs(cfg: PipelineConfig, out_root: Path) -> dict[str, Path]:
    run = Path(out_root) / cfg.name
    dirs = {"run": run, "cache": Path(out_root) / "cache" / "aes", "state": run / "state",
            "classifier": run / "classifier", "at": run / "teacher_at", "nt": run / "teacher_nt",
            "results": run / "results.parquet"}
    dirs.update({s.variant: run / f"student_{s.variant}" for s in cfg.students})
    dirs.update({b: run / f"baseline_{b}" for b in cfg.baselines}, surrogate=run / "surrogate")
    return dirs


def prepare_run(cfg: PipelineConfig, out_root: Path) -> dict[str, Path]:
    """Create the run directory and record its config; refuse a different config under the same name."""
    dirs = run_dirs(cfg, out_root)
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg)))
    path = dirs["run"] / "config.json"
    if path.exists() and read_json(path) != cfg_dict:
        raise StageConflict(f"{path}: run {cfg.name!r} exists with another config; pick another --name")
    write_json(path, cfg_dict)
    return dirs


def run_stage(dirs, name, out, config, fn, log):
    """Run fn() unless `out` already holds this stage's finished checkpoint; log either way."""
    if out is not None and finished(out, config):
        log_stage(dirs["run"], name, "skipped")
        log(f"[{name}] done already: {out}")
        return out
    storage = dirs.get("storage")  # the Ray layer's Train runs live there
    resumed = (dirs["state"] / f"{name}.pt").exists() or (
        storage is not None and (storage / f"{dirs['run'].name}-{name}").exists())
    log_stage(dirs["run"], name, "resumed" if resumed else "started")
    t0 = time.time()
    result = fn()
    log_stage(dirs["run"], name, "finished", seconds=time.time() - t0, start=t0)
    log(f"[{name}] finished in {time.time() - t0:.1f}s: {result}")
    return result


def run_pipeline(cfg: PipelineConfig, out_root: str | Path, rt: Runtime = Runtime(),
                 classifier_dir: str | Path | None = None, log=print) -> Path:
    """Run (or resume) every stage of `cfg` under out_root/<name>; returns the results parquet."""
    t_start = time.time()
    data = load_cifar(cfg.data.data_dir, cfg.data.n_train, cfg.data.n_test)  # bad data: fail before writing
    dirs = prepare_run(cfg, Path(out_root))
    log(f"[data] {len(data.train_y)} train / {len(data.test_y)} test images from {data.source}")
    st = dirs["state"]
    if classifier_dir is None:
        clf = run_stage(dirs, "classifier", dirs["classifier"], flatten(cfg.classifier), lambda: train_classifier(
            cfg.classifier, data, dirs["classifier"], rt, st / "classifier.pt"), log)
    else:
        clf = Path(classifier_dir)
        read_meta(clf)
    log(f"[classifier] test accuracy {read_meta(clf)['metrics'].get('test_acc', float('nan')):.4f}")
    ae = run_stage(dirs, "aes", None, None, lambda: make_training_aes(cfg.ae, clf, data, dirs["cache"], rt), log)
    teachers = {}
    for t in (cfg.at_teacher, cfg.nt_teacher):
        teachers[t.kind] = run_stage(dirs, f"teacher_{t.kind}", dirs[t.kind], flatten(t), lambda t=t: train_teacher(
            t, data, dirs[t.kind], rt, clf, ae, st / f"teacher_{t.kind}.pt"), log)
    variants = {"none": None, "at_teacher": cfg.at_teacher, "nt_teacher": cfg.nt_teacher}
    purifiers = {"none": None, "at_teacher": teachers["at"], "nt_teacher": teachers["nt"]}
    for s in cfg.students:
        purifiers[s.variant] = run_stage(dirs, f"student_{s.variant}", dirs[s.variant], flatten(s),
                                      lambda s=s: train_student(s, data, dirs[s.variant], teachers, clf, ae, rt,
                                                                st / f"student_{s.variant}.pt"), log)
        variants[s.variant] = s
    for b in cfg.baselines:
        purifiers[b] = run_stage(dirs, f"baseline_{b}", dirs[b], flatten(getattr(cfg, b)), lambda b=b: train_baseline(
            b, cfg, data, dirs[b], rt, clf, st / f"baseline_{b}.pt"), log)
        variants[b] = getattr(cfg, b)
    sur = None
    if "transfer" in cfg.eval.threat_models:
        sur = run_stage(dirs, "surrogate", dirs["surrogate"], flatten(cfg.surrogate), lambda: train_classifier(
            cfg.surrogate, data, dirs["surrogate"], rt, st / "surrogate.pt"), log)
    return run_stage(dirs, "evaluate", None, None, lambda: _evaluate(cfg, dirs, clf, purifiers, variants, data, rt,
                                                                  t_start, log, sur), log)


def _evaluate(cfg, dirs, clf, purifiers, variants, data, rt, t_start, log, surrogate=None) -> Path:
    rows = evaluate(cfg.eval, clf, purifiers, data, rt, surrogate_dir=surrogate, log=log)
    extra = {"classifier.test_acc": read_meta(clf)["metrics"].get("test_acc"), "data.source": data.source,
             "data.train_size": len(data.train_y), "wall_seconds": time.time() - t_start, **provenance(rt)}
    return write_results(make_rows(cfg, variants, rows, extra), dirs["results"])
