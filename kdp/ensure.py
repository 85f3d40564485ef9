"""Make an artifact once: skip it when done, else make it (under a lock where makers may race),
logging its start, skip and finish once each in the run's event log."""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Callable

from kdp.checkpoint import read_meta
from kdp.events import log_event
from kdp.interrupt import STOP, before
from kdp.locks import held


def ensure(out: Path, done: Callable[[], bool], make: Callable[[], Path], log_dir: Path, stage: str, who: str | None,
           log=print, lock: bool = True, skip: str = "reused", resumed: bool = False,
           lock_timeout_s: float | None = None, locker=held) -> Path:
    """Return `out`, making it with make() unless done(); log skipped/started/finished once.
    With `lock`, concurrent callers serialize on an exclusive lock of `<out>.lock` (`locker`:
    an flock, kdp.locks.held, or a sweep's lease through Ray): one makes, the rest wait (at
    most lock_timeout_s, then fail naming the holder) and reuse it. A lock dies with its
    process; artifacts appear by rename."""
    by = {"by": who} if who else {}
    if done():
        log_event(log_dir, stage, skip, path=str(out), **by)
        log(f"[{stage}] done already: {out}")
        return out
    if not lock:
        return _make(out, make, log_dir, stage, by, log, resumed)
    with locker(out.parent / f"{out.name}.lock", f"{who or ''} making {stage}".strip(), lock_timeout_s,
              on_wait=lambda h: log(f"[{stage}] {h} is making it; waiting")):
        if done():
            log_event(log_dir, stage, skip, path=str(out), **by)
            return out
        return _make(out, make, log_dir, stage, by, log, resumed)


def _make(out, make, log_dir, stage, by, log, resumed) -> Path:
    before(f"stage {stage}")  # a time-limited command starts nothing once its time is up
    t0 = time.time()
    log_event(log_dir, stage, "resumed" if resumed else "started", path=str(out), **by)
    log(f"[{stage}] {'resumed' if resumed else 'started'}")
    try:
        result = make()
    except BaseException as e:
        if STOP.is_set() or not isinstance(e, Exception):  # Ctrl-C, SIGTERM: its last epoch's state is kept
            log_event(log_dir, stage, "interrupted", path=str(out), error=f"{type(e).__name__}: {e}", **by)
        else:  # the run's log keeps what failed, traceback included; the caller re-raises
            log_event(log_dir, stage, "failed", path=str(out), error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc(), **by)
        raise
    seconds = time.time() - t0
    log_event(log_dir, stage, "finished", path=str(out), seconds=seconds, start=t0, **by)
    acc = (read_meta(out)["metrics"].get("test_acc") if (out / "checkpoint.json").is_file() else None)
    log(f"[{stage}] finished in {seconds:.1f}s" + (f", test accuracy {acc:.4f}" if acc is not None else ""))
    return result if result is not None else out
