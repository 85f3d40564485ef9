"""`kdp cache`: the AE caches under an output root, their sizes, and pruning.

Two caches hold crafted AEs (each entry a directory with `x_adv.npy` and `meta.json`):
- training AEs (`<root>/cache/aes/`, a sweep's `<sweep>/shared/aes/`), used by the runs whose
  event logs name the entry (the `aes` stage's skipped / started / finished lines);
  matched by cache and key, so a moved root still matches;
- evaluation AEs (`<root>/cache/eval_aes/`, `<sweep>/shared/eval_aes/`), used by the runs
  holding a model they were crafted on (a classifier, a surrogate, SOAP's own classifier):
  the entry's meta.json records that model's `model_sha256`.
An entry's last use is its meta.json's mtime (a cache hit touches it). Pruning removes an
entry under its lock (skipping one another process holds), by a rename, then deletes it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kdp.storage import local_only
from kdp.errors import ConfigError, NotFoundError
from kdp.events import read_events
from kdp.locks import LockTimeout, held

KINDS = {"aes": "training AEs", "eval_aes": "evaluation AEs"}
META = "meta.json"


@dataclass(frozen=True)
class Entry:
    """One cache entry."""
    path: Path
    kind: str
    """'aes' or 'eval_aes'."""
    bytes: int
    last_used: float
    """meta.json's mtime (seconds since the epoch)."""
    model_sha256: str | None
    """Evaluation AEs: the model they were crafted on (None for older entries)."""


def find_entries(root: Path) -> list[Entry]:
    """Every cache entry under root (its own cache and its sweeps' shared ones)."""
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such output root")
    out = []
    for kind in KINDS:
        for cache in [root / "cache" / kind, *sorted(root.glob(f"*/shared/{kind}"))]:
            for d in sorted(p for p in cache.glob("*") if p.is_dir() and (p / META).is_file()):
                meta = _meta(d)
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                out.append(Entry(d, kind, size, (d / META).stat().st_mtime, meta.get("model_sha256")))
    return out


def _meta(entry: Path) -> dict:
    try:
        return json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return {}


def used_entries(root: Path, entries: list[Entry]) -> set[Path]:
    """The entries some run under root uses (see the module docstring)."""
    # by <cache>/<key> (keys are content hashes), so a moved or copied root still matches
    named = {Path(e["path"]).parts[-2:] for d in _event_dirs(root) for e in read_events(d) if e.get("path")}
    models = _model_shas(root) if any(e.kind == "eval_aes" for e in entries) else set()
    return {e.path for e in entries if e.path.parts[-2:] in named
            or (e.kind == "eval_aes" and (e.model_sha256 is None or e.model_sha256 in models))}


def _event_dirs(root: Path) -> list[Path]:
    return sorted({p.parent.parent for p in Path(root).glob("**/events/*.jsonl")})


def _model_shas(root: Path) -> set[str]:
    """model_sha256 of every model AEs are crafted on, in the checkpoints under root."""
    import torch

    from kdp.baselines import BASELINES
    from kdp.checkpoint import load_checkpoint
    from kdp.stages.eval_cache import model_sha

    shas = set()
    for meta in Path(root).glob("**/checkpoint.json"):
        spec = json.loads(meta.read_text()).get("spec", {})
        baseline = BASELINES.get(spec.get("name"))  # one with its own classifier (SOAP): AEs are crafted on it
        if spec.get("kind") == "classifier" or (baseline is not None and hasattr(baseline.purifier, "own_classifier")):
            model = load_checkpoint(meta.parent, torch.device("cpu"))[0]
            shas.add(model_sha(getattr(model, "own_classifier", None) or model))
    return shas


def prune(entries: list[Entry], dry_run: bool = False) -> list[Entry]:
    """Remove the entries (under each one's lock; one held elsewhere is skipped); returns those removed."""
    removed = []
    for e in entries:
        if dry_run:
            removed.append(e)
            continue
        try:
            with held(e.path.parent / f"{e.path.name}.lock", "kdp cache prune", timeout_s=0):
                aside = e.path.with_name(f".{e.path.name}.pruned-{uuid.uuid4().hex[:8]}")
                os.rename(e.path, aside)  # readers never see half an entry
                shutil.rmtree(aside, ignore_errors=True)
                removed.append(e)
        except LockTimeout:
            continue
    return removed


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def cache_command(args) -> None:
    """List the caches under args.root; prune by age (--older-than DAYS) and/or --unused."""
    if args.older_than is not None and args.older_than < 0:
        raise ConfigError(f"--older-than must be >= 0 days, got {args.older_than:g}")
    entries = find_entries(local_only(args.root, "kdp cache"))
    caches: dict[Path, list[Entry]] = {}
    for e in entries:
        caches.setdefault(e.path.parent, []).append(e)
    print(f"{'cache':<48} {'what':<15} {'entries':>7} {'size':>10}  last used")
    for cache, es in caches.items():
        print(f"{str(cache):<48} {KINDS[es[0].kind]:<15} {len(es):>7} {_mb(sum(e.bytes for e in es)):>10}  "
              f"{_when(min(e.last_used for e in es))} .. {_when(max(e.last_used for e in es))}")
    print(f"total: {len(entries)} entries, {_mb(sum(e.bytes for e in entries))}")
    if args.older_than is None and not args.unused:
        return
    doomed = entries
    if args.older_than is not None:
        doomed = [e for e in doomed if time.time() - e.last_used > args.older_than * 86400]
    if args.unused:
        used = used_entries(Path(args.root), doomed)
        doomed = [e for e in doomed if e.path not in used]
    gone = prune(doomed, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in gone:
        print(f"{verb} {e.path} ({_mb(e.bytes)})")
    for e in (e for e in doomed if e not in gone):
        print(f"kept {e.path}: in use (a run reads or makes it)")
    print(f"{verb} {len(gone)} entries, {_mb(sum(e.bytes for e in gone))}")


def add_cache_args(p) -> None:
    p.add_argument("root", help="output root (the --out of runs and sweeps)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="prune entries not used for DAYS days")
    p.add_argument("--unused", action="store_true", help="prune entries no run under root uses")
    p.add_argument("--dry-run", action="store_true", help="say what would be pruned, remove nothing")
