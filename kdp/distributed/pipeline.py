"""The pipeline on a Ray cluster. Stage 0 trains the classifier with a TorchTrainer; the
training AEs are one Ray task; stage 1 fits the AT and NT teachers' trainers at the same
time (one thread each), beside the transfer surrogate's; stage 2 fits every student's
trainer at once, while each baseline purifier trains in a Ray task; stage 3 shards the
attack suite by threat model, attack and test-set slice into Ray tasks and writes the parquet table.

Checkpoints: every epoch reports a Ray Train checkpoint (the last `keep_checkpoints` are
kept under <out>/ray/<run>-<stage>); a failed worker group restarts from the last one
(`max_failures`). A finished stage becomes the core's checkpoint directory, so re-running
the job with the same run name skips it, and a half-done stage's Train run resumes from
its last checkpoint (Ray finds the run snapshot by name).
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from kdp.checkpoint import load_state, read_meta, save_checkpoint
from kdp.config import PipelineConfig, Runtime, ScaleConfig, flatten
from kdp.data import load_cifar
from kdp.distributed.loops import STATE, train_loop
from kdp.models import build_model
from kdp.pipeline import prepare_run, run_stage
from kdp.provenance import provenance
from kdp.results import make_rows, write_results
from kdp.stages import evaluate, make_training_aes
from kdp.stages.baselines import train_baseline
from kdp.stages.common import log_stage
from kdp.stages.classifier import classifier_spec
from kdp.stages.evaluate import finalize, merge_rows, shards
from kdp.stages.purifier import purifier_spec


def _task_resources(scale: ScaleConfig) -> dict:
    """Task options. DEFAULT scheduling: a task started from a Tune trial must not be captured
    by the trial's tiny placement group (it could never fit there)."""
    return {"num_cpus": scale.cpus_per_worker, "num_gpus": scale.gpus_per_worker if scale.use_gpu else 0,
            "scheduling_strategy": "DEFAULT"}


def _trainer(stage: str, loop_config: dict, scale: ScaleConfig, run_name: str, storage: Path,
             callbacks=()) -> TorchTrainer:
    resources = {"CPU": scale.cpus_per_worker, **({"GPU": scale.gpus_per_worker} if scale.use_gpu else {})}
    return TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scale.keep_checkpoints)))


def _fit(stage: str, loop_config: dict, scale: ScaleConfig, run_dir: Path, storage: Path, callbacks=()):
    """trainer.fit(), resuming the stage's Train run if one exists. Ray writes its run snapshot
    in place, so a driver killed mid-write can leave one that cannot be resumed: then the
    broken run is moved aside (logged) and the stage starts over rather than failing."""
    name = f"{run_dir.name}-{stage}"
    resumed = (storage / name).exists()
    try:
        return _trainer(stage, loop_config, scale, name, storage, callbacks).fit()
    except Exception as e:  # noqa: BLE001 - any failure of a resumed run gets one fresh try
        if not resumed:
            raise
        aside = storage / f"{name}.broken-{int(time.time())}"
        os.rename(storage / name, aside)
        log_stage(run_dir, stage, "resume_failed", error=f"{type(e).__name__}: {e}"[:500], moved_to=str(aside))
        return _trainer(stage, loop_config, scale, name, storage, callbacks).fit()


def fit_stage(stage: str, kind: str, cfg, spec: dict, paths: dict, scale: ScaleConfig, rt: Runtime,
              data_cfg, run_dir: Path, storage: Path, out: Path, callbacks=()) -> Path:
    """Train one stage with a TorchTrainer and turn its last checkpoint into a core checkpoint dir.
    `callbacks` are Ray Train callbacks (a Tune trial passes TuneReportCallback)."""
    loop_config = {"stage": stage, "kind": kind, "cfg": flatten(cfg), "data": flatten(data_cfg),
                   "runtime": dataclasses.asdict(rt), "run_dir": str(run_dir), **paths}
    result = _fit(stage, loop_config, scale, run_dir, storage, callbacks)
    with result.checkpoint.as_directory() as d:
        state = load_state(Path(d) / STATE)
    model = build_model(spec["kind"], spec["name"], **spec["kwargs"])
    model.load_state_dict(state["model"])
    metrics = {k: v for k, v in state["final"].items() if k == "test_acc"}
    metrics.update(history=state["history"], ray_checkpoint=result.checkpoint.path)
    return save_checkpoint(out, model, spec, flatten(cfg), metrics, provenance(rt))


def _stage_runner(cfg, dirs, scale, rt, log):
    def run(stage, kind, stage_cfg, spec, paths):
        fn = lambda: fit_stage(stage, kind, stage_cfg, spec, {k: _str(v) for k, v in paths.items()}, scale,
                               rt, cfg.data, dirs["run"], dirs["storage"], dirs["run"] / stage)
        return run_stage(dirs, stage, dirs["run"] / stage, flatten(stage_cfg), fn, log)
    return run


def _str(v):
    return {k: str(p) for k, p in v.items()} if isinstance(v, dict) else str(v)


def run_distributed(cfg: PipelineConfig, out_root: str | Path, scale: ScaleConfig = ScaleConfig(),
                    rt: Runtime = Runtime(), classifier_dir: str | Path | None = None, log=print) -> Path:
    """Run (or resume) the whole pipeline on the connected Ray cluster; returns the parquet path."""
    t_start, out_root = time.time(), Path(out_root).expanduser().resolve()
    data = load_cifar(cfg.data.data_dir, cfg.data.n_train, cfg.data.n_test)
    dirs = prepare_run(cfg, out_root)
    dirs["storage"] = out_root / "ray"
    log(f"[data] {len(data.train_y)} train / {len(data.test_y)} test images from {data.source}")
    run = _stage_runner(cfg, dirs, scale, rt, log)
    clf = Path(classifier_dir) if classifier_dir else run("classifier", "classifier", cfg.classifier,
                                                           classifier_spec(cfg.classifier), {})
    log(f"[classifier] test accuracy {read_meta(clf)['metrics'].get('test_acc', float('nan')):.4f}")
    aes = ray.remote(make_training_aes).options(**_task_resources(scale))
    ae = run_stage(dirs, "aes", None, None, lambda: ray.get(aes.remote(cfg.ae, clf, data, dirs["cache"], rt)), log)
    base = {"classifier_dir": clf, "ae_dir": ae}
    transfer = "transfer" in cfg.eval.threat_models
    with ThreadPoolExecutor(3) as pool:  # both teachers (and the surrogate) in flight together
        futs = {t.kind: pool.submit(run, f"teacher_{t.kind}", "teacher", t, purifier_spec(t), base)
                for t in (cfg.at_teacher, cfg.nt_teacher)}
        sur = pool.submit(run, "surrogate", "classifier", cfg.surrogate, classifier_spec(cfg.surrogate), {}) \
            if transfer else None
        teachers = {k: f.result() for k, f in futs.items()}
        sur = sur.result() if sur is not None else None
    with ThreadPoolExecutor(max(1, len(cfg.students) + len(cfg.baselines))) as pool:
        futs = {s.variant: pool.submit(run, f"student_{s.variant}", "student", s, purifier_spec(s),
                                       {**base, "teacher_dirs": teachers}) for s in cfg.students}
        futs.update({b: pool.submit(_baseline_task, cfg, b, dirs, data, clf, scale, rt, log) for b in cfg.baselines})
        trained = {k: f.result() for k, f in futs.items()}
    purifiers = {"none": None, "at_teacher": teachers["at"], "nt_teacher": teachers["nt"], **trained}
    variants = {"none": None, "at_teacher": cfg.at_teacher, "nt_teacher": cfg.nt_teacher,
                **{s.variant: s for s in cfg.students}, **{b: getattr(cfg, b) for b in cfg.baselines}}
    return run_stage(dirs, "evaluate", None, None, lambda: _evaluate(
        cfg, dirs, clf, purifiers, variants, data, scale, rt, t_start, log, sur), log)


def _baseline_task(cfg, name, dirs, data, clf, scale, rt, log) -> Path:
    """A baseline purifier trained in one Ray task (resumable from its per-epoch state file)."""
    task = ray.remote(train_baseline).options(**_task_resources(scale))
    return run_stage(dirs, f"baseline_{name}", dirs[name], flatten(getattr(cfg, name)), lambda: ray.get(task.remote(
        name, cfg, data, dirs[name], rt, clf, dirs["state"] / f"baseline_{name}.pt")), log)


def _eval_shard(cfg, clf, purifiers, data, rt, surrogate, threat, attack, start, stop):
    return evaluate(cfg, clf, purifiers, data, rt, start, stop, (attack,), (threat,), surrogate, log=lambda *_: None)


def evaluate_on_ray(eval_cfg, clf, purifiers: dict, data, scale: ScaleConfig, rt: Runtime, log=print,
                    surrogate=None) -> list[dict]:
    """Stage 3: one Ray task per (threat model, attack, test slice); rows summed per cell,
    then the sanity checks derived from the summed counts (warnings in this log)."""
    task = ray.remote(_eval_shard).options(**_task_resources(scale))
    data_ref = ray.put(data)
    work = shards(eval_cfg, len(data.test_y), scale.eval_shard_size, surrogate is not None)
    log(f"[evaluate] {len(work)} tasks over {len(data.test_y)} test images")
    refs = [task.remote(eval_cfg, clf, purifiers, data_ref, rt, surrogate, *w) for w in work]
    return finalize(merge_rows([r for rs in ray.get(refs) for r in rs]), eval_cfg, log)


def _evaluate(cfg, dirs, clf, purifiers, variants, data, scale, rt, t_start, log, surrogate=None) -> Path:
    rows = evaluate_on_ray(cfg.eval, clf, purifiers, data, scale, rt, log, surrogate)
    extra = {"classifier.test_acc": read_meta(clf)["metrics"].get("test_acc"), "data.source": data.source,
             "data.train_size": len(data.train_y), "wall_seconds": time.time() - t_start, **provenance(rt)}
    return write_results(make_rows(cfg, variants, rows, extra), dirs["results"])
