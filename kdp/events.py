"""The run's event log: what ran, was skipped or resumed, and every training epoch.

Each writing process appends to its own file, <dir>/events/<host>-<pid>.jsonl, one JSON
line per event in a single write; readers merge the files by time. One file per writer
because appends from several NFS clients to one file are not atomic (each client writes
at the size it last saw), and the driver, Train workers and sweep trials write from many
nodes. Times come from each node's clock.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from kdp.errors import disk_errors

EVENTS = "events"


def events_file(run_dir: Path) -> Path:
    """This process's own event file under run_dir."""
    return Path(run_dir) / EVENTS / f"{socket.gethostname()}-{os.getpid()}.jsonl"


def log_event(run_dir: Path | None, stage: str, status: str, **extra) -> None:
    """Append one event (stage, status, time, host, pid, extra fields) to this process's file."""
    if run_dir is None:
        return
    path = events_file(run_dir)
    line = json.dumps({"stage": stage, "status": status, "time": time.time(), "host": socket.gethostname(),
                       "pid": os.getpid(), **extra}) + "\n"
    with disk_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _parse(chunk: bytes) -> list[dict]:
    return [json.loads(line) for line in chunk.decode().splitlines() if line.strip()]


def read_events(run_dir: Path) -> list[dict]:
    """Every event under run_dir, ordered by time (ties: by file, then line)."""
    files = sorted((Path(run_dir) / EVENTS).glob("*.jsonl"))
    events = [e for f in files for e in _parse(f.read_bytes())]
    return sorted(events, key=lambda e: e["time"])  # stable: a writer's own order is kept


class EventTail:
    """The events appended under run_dir since the last call (whole lines only); with
    `from_now`, only those appended after it was made (a re-run shows only its own)."""

    def __init__(self, run_dir: Path, from_now: bool = False):
        self.dir = Path(run_dir) / EVENTS
        self.offsets: dict[Path, int] = {}
        if from_now:
            self.new()

    def new(self) -> list[dict]:
        out = []
        for f in sorted(self.dir.glob("*.jsonl")) if self.dir.is_dir() else []:
            with open(f, "rb") as fh:
                fh.seek(self.offsets.get(f, 0))
                chunk = fh.read()
            end = chunk.rfind(b"\n") + 1
            self.offsets[f] = self.offsets.get(f, 0) + end
            out += _parse(chunk[:end])
        return sorted(out, key=lambda e: e["time"])
