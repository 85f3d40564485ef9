"""What each stage of the graph (kdp.graph) runs, named by its `fn` in its kind's table: the
training recipes (RECIPES, `train` stages), the training AEs (TASKS), an untrained baseline's
checkpoint and the evaluation (DRIVER: run by the caller; the evaluation fans its shards out
through the executor and writes the results parquet)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

from kdp.baselines import BASELINES
from kdp.checkpoint import is_complete, read_meta, save_checkpoint
from kdp.files import atomic_path, read_json
from kdp.config import Runtime, ThreatModel
from kdp.configio import flatten
from kdp.data import Cifar
from kdp.stages.progress import Progress, shard_work
from kdp.provenance import provenance
from kdp.results import make_rows, write_results
from kdp.stages.aes import make_training_aes
from kdp.stages.classifier import classifier_recipe
from kdp.stages.purifier import student_recipe, teacher_recipe
from kdp.stages.eval_cache import tensor_sha
from kdp.interrupt import before
from kdp.indicators import conclude
from kdp.stages.evaluate import evaluate, finalize, said_once
from kdp.stages.shards import merge_rows, shards


def make_aes_task(cfg, inputs: dict, out: Path, data: Cifar, rt: Runtime) -> Path:
    """The training AEs, crafted into the cache entry `out` (whose name is their cache key)."""
    return make_training_aes(cfg, Path(inputs["classifier"]), data, Path(out).parent, rt)


def untrained_driver(stage, inputs: dict, out: Path, run, ex) -> Path:
    """A baseline with nothing to learn (no recipe): its checkpoint, the module with its spec and
    config, written as is so that it loads like every other purifier."""
    defense, cfg = BASELINES[stage.variant], stage.config
    if is_complete(out, flatten(cfg)):
        return out
    module = defense.purifier(**defense.kwargs(cfg))
    return save_checkpoint(out, module, defense.spec(cfg), flatten(cfg), {"trained": False}, provenance(run.rt))


def eval_shard(eval_cfg, classifier: Path, purifiers: dict, data: Cifar, rt: Runtime, surrogate: Path | None,
               cache: Path | None, store, threat: str | None, attack: str | None, start: int,
               stop: int | None, on_batch=None) -> list[dict]:
    """Raw rows of one shard: one (threat model, attack, test slice), or everything (None, None).
    `on_batch`: the driver's progress (kdp.stages.progress), given where the shard runs in its process."""
    own, me = None, (eval_cfg, classifier, purifiers, data, rt, surrogate, cache, store, threat, attack, start, stop)
    if on_batch is None and rt.progress:  # a shard on its own (a Ray task) prints its own lines, to its log
        own = Progress([me], _work_of)
        on_batch = own.tick
    with own.lines() if own else contextlib.nullcontext():
        rows = evaluate(eval_cfg, classifier, purifiers, data, rt, start, stop, None if attack is None else (attack,),
                        None if threat is None else (threat,), surrogate,
                        log=print if rt.progress else (lambda *_: None), cache_dir=cache, store=store,
                        on_batch=on_batch)
    if own:
        own.done(me)
        own.finish()
    return rows


def _work_of(a: tuple) -> tuple[str, dict]:
    """kdp.stages.progress.shard_work of an eval_shard argument tuple."""
    cfg, purifiers, data, surrogate, (threat, attack, start, stop) = a[0], a[2], a[3], a[5], a[8:12]
    return shard_work(cfg, len(data.test_y), threat, attack, start, stop, purifiers, surrogate is not None)


def evaluation_key(stage, inputs: dict, run) -> str:
    """sha256 of what the evaluation's rows follow from: the config, the variants evaluated,
    each input's weights, the test images, the extra columns and the code and library versions."""
    weights = {n: read_meta(p)["weights_sha256"] if (Path(p) / "checkpoint.json").is_file() else str(p)
               for n, p in sorted(inputs.items())}
    prov = provenance(run.rt)
    what = {"config": flatten(stage.config), "evaluates": stage.evaluates, "inputs": weights,
            "test": tensor_sha(run.data.test_x, run.data.test_y), "extra": run.extra,
            "code": {k: prov[k] for k in sorted(prov) if k == "git_sha" or k.endswith("_version")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _groups(cfg, threat: str | None, attack: str | None, purifiers: dict) -> list[dict]:
    """A shard's defenses: a `full` shard attacks each one end to end on its own, so it is split
    per defense (shards run in parallel), less those the classifier threat model's shards run
    already (`said_once`); other shards share one crafted set, so they keep all."""
    if threat != ThreatModel.FULL:
        return [purifiers]
    return [{v: p} for v, p in purifiers.items()
            if not said_once(BASELINES[v].purifier if v in BASELINES else None, threat, attack, cfg)]


def evaluate_driver(stage, inputs: dict, out: Path, run, ex) -> Path:
    """Every evaluated variant under every threat model, through the executor's shards; then
    the checks from the summed counts, and one parquet with config and provenance per row."""
    cfg, graph = run.cfg, {s.name: s for s in run.graph}
    purifiers = {"none": None} if "none" in stage.evaluates else {}
    variants = dict.fromkeys(purifiers)
    for s in (graph[n] for n in stage.needs if graph[n].variant in stage.evaluates):
        purifiers[s.variant], variants[s.variant] = inputs[s.name], s.config
    surrogate = inputs.get("surrogate")
    n_test, limited = len(run.data.test_y), run.rt.time_limit is not None
    # a time-limited run stops between shards: per (threat model, attack) and 8 batches of test
    # images (batch-aligned, so the same AEs as one pass), so that each fits a short lease
    items = (shards(cfg.eval, n_test, 8 * cfg.eval.batch_size, surrogate is not None) if limited
             else ex.eval_items(cfg.eval, n_test, surrogate is not None))
    cache = run.eval_cache if run.rt.eval_cache else None
    args = [(cfg.eval, inputs["classifier"], group, run.data, run.rt, surrogate, cache, run.store, *w)
            for w in items for group in _groups(cfg.eval, w[0], w[1], purifiers)]
    run.say(f"[evaluate] {len(items)} shard(s) over {n_test} test images")
    log_file = str(run.run_dir / "logs" / "evaluate.log")
    kept = ShardRows(run.run_dir / "state" / "evaluate", evaluation_key(stage, inputs, run)) if limited else None
    progress = Progress(args, _work_of, run.say) if run.rt.progress else None
    with progress.lines() if progress else contextlib.nullcontext():
        shard_rows = (kept.map(ex, eval_shard, args, log_file, run.store, progress) if kept
                      else ex.map(eval_shard, args, log_file, run.store, progress))
    if progress:
        progress.finish()
    rows = conclude(finalize(merge_rows([r for rs in shard_rows for r in rs]), cfg.eval, run.say),
                    {t: cfg.eval.suite(t) for t in cfg.eval.threat_models}, run.say)
    extra = {"classifier.test_acc": read_meta(inputs["classifier"])["metrics"].get("test_acc"),
             "data.source": run.data.source, "data.train_size": len(run.data.train_y),
             "wall_seconds": time.time() - run.t_start, **provenance(run.rt), **run.extra}
    written = write_results(make_rows(cfg, variants, rows, extra), out, evaluation_key(stage, inputs, run))
    if kept is not None:
        kept.clear()
    return written


class ShardRows:
    """The rows of each finished evaluation shard, one JSON file each under `folder`, named by
    the evaluation's key (what its rows follow from) and the shard's place in the list: a
    stopped evaluation resumes with the shards it had not finished."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key[:16]

    def _path(self, i: int, arg: tuple) -> Path:
        threat, attack, start = arg[8], arg[9], arg[10]
        return self.folder / f"{self.key}-{i:03d}-{threat}-{attack}-{start}.json"

    def map(self, ex, fn, args: list[tuple], log_file: str | None, store, progress=None) -> list[list[dict]]:
        """[fn(*a) for a in args] through the executor, one shard at a time, each kept as it ends."""
        out = []
        for i, a in enumerate(args):
            path = self._path(i, a)
            if not path.is_file():
                before(f"evaluation shard {i + 1}/{len(args)} ({a[8]} {a[9]})")
                rows = ex.map(fn, [a], log_file, store, progress)[0]
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps(rows, default=lambda v: v.item()))
            elif progress:
                progress.done(a, ran=False)  # kept from the stopped run: done, but not in the rate
            out.append(read_json(path, "evaluation shard rows"))
        return out

    def clear(self) -> None:
        for p in self.folder.glob(f"{self.key}-*.json"):
            p.unlink()


RECIPES = {"classifier": classifier_recipe, "teacher": teacher_recipe, "student": student_recipe,
           **{name: d.recipe for name, d in BASELINES.items() if d.recipe is not None}}
TASKS = {"aes": make_aes_task}
DRIVER = {"untrained": untrained_driver, "evaluate": evaluate_driver}
