"""Helpers every stage uses: finished-stage detection and a stage log."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kdp.checkpoint import is_complete, read_meta


class StageConflict(ValueError):
    """A finished checkpoint exists at the output path but was made with another config."""


def finished(out: Path, config: dict) -> bool:
    """True if `out` is a complete checkpoint made with `config` (so the stage can be skipped)."""
    if not is_complete(out):
        return False
    old = read_meta(out)["config"]
    if old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise StageConflict(f"{out}: exists with a different config ({', '.join(diff)}); "
                            "use another run name or delete it")
    return True


def log_stage(run_dir: Path | None, stage: str, status: str, **extra) -> None:
    """Append one JSON line to run_dir/stages.jsonl (what ran, was skipped or resumed, when)."""
    if run_dir is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"stage": stage, "status": status, "time": time.time(), "pid": os.getpid(), **extra})
    with open(run_dir / "stages.jsonl", "a") as f:  # one short O_APPEND write per line
        f.write(line + "\n")
