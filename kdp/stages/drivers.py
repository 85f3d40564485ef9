"""What the graph's task and driver stages do (kdp.graph names them in TASKS and DRIVER):
the training AEs (a task), JPEG's checkpoint and the evaluation (drivers, run by the caller;
the evaluation fans its shards out through the executor and writes the results parquet)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from kdp.checkpoint import read_meta
from kdp.config import Runtime
from kdp.configio import flatten
from kdp.data import Cifar
from kdp.provenance import provenance
from kdp.results import make_rows, write_results
from kdp.stages.aes import make_training_aes
from kdp.stages.baselines import train_jpeg
from kdp.stages.eval_cache import tensor_sha
from kdp.stages.evaluate import evaluate, finalize, merge_rows


def make_aes_task(cfg, inputs: dict, out: Path, data: Cifar, rt: Runtime) -> Path:
    """The training AEs, crafted into the cache entry `out` (whose name is their cache key)."""
    return make_training_aes(cfg, Path(inputs["classifier"]), data, Path(out).parent, rt)


def jpeg_driver(stage, inputs: dict, out: Path, run, ex) -> Path:
    return train_jpeg(stage.config, run.data, out, run.rt)


def eval_shard(eval_cfg, classifier: Path, purifiers: dict, data: Cifar, rt: Runtime, surrogate: Path | None,
               cache: Path | None, store, threat: str | None, attack: str | None, start: int,
               stop: int | None) -> list[dict]:
    """Raw rows of one shard: one (threat model, attack, test slice), or everything (None, None)."""
    return evaluate(eval_cfg, classifier, purifiers, data, rt, start, stop, None if attack is None else (attack,),
                    None if threat is None else (threat,), surrogate, log=print if rt.progress else (lambda *_: None),
                    cache_dir=cache, store=store)


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


def _groups(threat: str | None, purifiers: dict) -> list[dict]:
    """A shard's defenses: a `full` shard attacks each one end to end on its own, so it is split
    per defense (shards run in parallel); other shards share one crafted set, so they keep all."""
    return [{v: p} for v, p in purifiers.items()] if threat == "full" else [purifiers]


def evaluate_driver(stage, inputs: dict, out: Path, run, ex) -> Path:
    """Every evaluated variant under every threat model, through the executor's shards; then
    the checks from the summed counts, and one parquet with config and provenance per row."""
    cfg, graph = run.cfg, {s.name: s for s in run.graph}
    purifiers = {"none": None} if "none" in stage.evaluates else {}
    variants = dict.fromkeys(purifiers)
    for s in (graph[n] for n in stage.needs if graph[n].variant in stage.evaluates):
        purifiers[s.variant], variants[s.variant] = inputs[s.name], s.config
    surrogate = inputs.get("surrogate")
    items = ex.eval_items(cfg.eval, len(run.data.test_y), surrogate is not None)
    cache = run.eval_cache if run.rt.eval_cache else None
    args = [(cfg.eval, inputs["classifier"], group, run.data, run.rt, surrogate, cache, run.store, *w)
            for w in items for group in _groups(w[0], purifiers)]
    run.say(f"[evaluate] {len(items)} shard(s) over {len(run.data.test_y)} test images")
    shard_rows = ex.map(eval_shard, args, str(run.run_dir / "logs" / "evaluate.log"), run.store)
    rows = finalize(merge_rows([r for rs in shard_rows for r in rs]), cfg.eval, run.say)
    extra = {"classifier.test_acc": read_meta(inputs["classifier"])["metrics"].get("test_acc"),
             "data.source": run.data.source, "data.train_size": len(run.data.train_y),
             "wall_seconds": time.time() - run.t_start, **provenance(run.rt), **run.extra}
    return write_results(make_rows(cfg, variants, rows, extra), out, evaluation_key(stage, inputs, run))


TASKS = {"aes": make_aes_task}
DRIVER = {"jpeg": jpeg_driver, "evaluate": evaluate_driver}
