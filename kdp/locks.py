"""An exclusive file lock that says who holds it, and gives up after a timeout.

Used for shared sweep artifacts (one trial makes, the rest wait and reuse) and for the
CIFAR-10 download (one process fetches). The holder writes its host, pid, what it is making
and since when into the lock file, so a waiter that times out can name it. A flock dies
with its process; on NFS (EFS) Linux maps flock to the server's byte-range locks.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from kdp.errors import StorageError

POLL_S = 0.5


class LockTimeout(StorageError, TimeoutError):
    """Waited longer than the timeout for a lock another process holds."""


def holder(path: Path) -> str:
    """Who holds (or last held) the lock at `path`, as one phrase."""
    try:
        h = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown holder"
    if not h:
        return "an unknown holder"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
    return f"host {h.get('host')} pid {h.get('pid')} ({h.get('who') or 'no name'}) since {since}"


def _record(fd: int, who: str) -> None:
    info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "who": who, "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)


@contextlib.contextmanager
def held(path: Path, who: str = "", timeout_s: float | None = None, on_wait=None):
    """Hold an exclusive lock on `path` for the block. If another process holds it, call
    on_wait(holder) once and wait, at most timeout_s seconds (None: forever), then raise
    LockTimeout naming the holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait(holder(path))
                waited = True
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout(f"{path}: still locked after {timeout_s:g}s by {holder(path)}") from None
                time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic())))
        _record(fd, who)
        yield
    finally:
        os.close(fd)  # releases the lock


def reading(path: Path) -> int:
    """A shared lock on `path` (a cache entry's lock file), held while the returned descriptor
    is open: `kdp cache` prunes an entry only under the exclusive lock, so it skips an entry
    that a run still reads. Waits while a prune holds it (a rename and a delete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd

