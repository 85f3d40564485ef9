"""Stopping a run within seconds on Ctrl-C (SIGINT) or SIGTERM, however long its stages had to go.

`stoppable()` installs the handlers around a command. The first signal sets `STOP` and raises
`Interrupted` in the main thread (the scheduler's wait); work in other threads sees `STOP` at
its next check (`check()`: every training batch, every forward pass of a model under attack)
and raises `Interrupted` too, so in-process stages end within a batch and keep their last
epoch's state for the resume. The Ray layer cancels its own work (kdp.distributed). A second
signal exits at once. Exit codes: 130 for SIGINT, 143 for SIGTERM, as a shell reports them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

STOP = threading.Event()
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_received: list[int] = []
_active: list[bool] = []
_reapers: list = []
_workers: list = []  # in_thread's threads: a library loop (Tune's) that may still call into Ray


class Interrupted(BaseException):
    """The run was stopped by a signal. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int | None = None):
        signum = signum or (_received[0] if _received else signal.SIGINT)  # default: the signal received
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = EXIT_CODES.get(signum, 130)


class OutOfTime(Interrupted):
    """The command's time limit (Runtime.time_limit) came before the next epoch or evaluation
    shard could end: stopped at that boundary, resumed by the same command. Exit code 75
    (EX_TEMPFAIL: try again)."""

    def __init__(self, what: str = ""):
        BaseException.__init__(self, f"time limit reached{' before ' + what if what else ''}")
        self.signum, self.code = None, 75


_deadline: list[float] = []  # time.monotonic() by which the command must stop; empty: no limit


@contextlib.contextmanager
def time_limit(minutes: float | None):
    """Within the block, `before(...)` stops work that would end after `minutes` from now (None: no
    limit). Nested limits keep the earlier deadline."""
    if minutes is None:
        yield
        return
    end = time.monotonic() + 60 * minutes
    _deadline.append(min([end, *_deadline]))
    try:
        yield
    finally:
        _deadline.pop()


def before(what: str, needs_s: float = 0.0) -> None:
    """Raise OutOfTime if `what`, expected to take `needs_s` seconds, would end past the deadline."""
    if _deadline and time.monotonic() + needs_s > _deadline[-1]:
        raise OutOfTime(what)


def check() -> None:
    """Raise Interrupted if a stop was asked for (cheap: call it per batch)."""
    if STOP.is_set():
        raise Interrupted()


def _handler(signum, frame):
    if STOP.is_set():  # the second signal: no more waiting
        sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now\n")
        sys.stderr.flush()
        os._exit(EXIT_CODES.get(signum, 130))
    _received[:] = [signum]
    STOP.set()
    raise Interrupted(signum)


@contextlib.contextmanager
def stoppable():
    """SIGINT and SIGTERM stop the block (see the module docstring); outside the main thread,
    where no handler can be installed, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in EXIT_CODES}
    STOP.clear()
    _active.append(True)
    try:
        yield
    finally:
        _active.pop()
        for s, h in old.items():
            signal.signal(s, h)
        STOP.clear()
        _received.clear()


def reinstall() -> None:
    """Take the signals back inside a stoppable block after a library set its own handlers
    (ray.init sets one for SIGTERM)."""
    if _active and threading.current_thread() is threading.main_thread():
        for s in EXIT_CODES:
            signal.signal(s, _handler)


def in_thread(fn, *args):
    """fn(*args) in a daemon thread while the main thread waits in Python: a signal then stops
    the wait cleanly, never inside a library's own C call (Tune's loop waits in Ray's), and
    the library's loop, outside the main thread, installs no signal handlers of its own."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name=getattr(fn, "__name__", "work"), daemon=True)
    _workers.append(t)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["value"]


def working() -> bool:
    """Is a thread started by `in_thread` still running (after an interruption: a library loop
    that has not seen the stop and may still call into Ray)?"""
    _workers[:] = [t for t in _workers if t.is_alive()]
    return bool(_workers)


def exit_with(code: int) -> None:
    """A script's exit: after an interruption without waiting for threads of stopped stages
    (nothing is left to finish: their state was saved each epoch), else sys.exit."""
    if code in EXIT_CODES.values():
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def stop_hook(module, args) -> None:
    """A forward pre-hook: an attack running inside a model's forward passes ends at the next one."""
    check()


def descendants(pid: int | None = None) -> list[tuple[int, str]]:
    """This process's descendants (Linux /proc), each as (pid, start time): what it started."""
    pid = pid or os.getpid()
    parent, start = {}, {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)], start[int(d)] = int(fields[1]), fields[19]
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += [(c, start[c]) for c in kids]
        frontier += kids
    return found


REAPER = """import os, sys, signal
pids = [(int(p), s) for p, s in (a.split(':') for a in sys.argv[1:])]
sys.stdin.read()  # EOF: the command's process is gone
for pid, start in pids:
    try:
        with open(f'/proc/{pid}/stat') as f:
            if f.read().rsplit(')', 1)[1].split()[19] == start:
                os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass
"""


def reap_at_exit() -> None:
    """Make sure what this process started ends with it: a reaper process kills the
    descendants alive now (pid and start time checked) once this process is gone. For an
    interrupted command's local Ray, whose shutdown can be cut short by a library thread still
    calling into it (the core worker then ends the process before the raylet and GCS)."""
    import subprocess

    pids = [f"{p}:{s}" for p, s in descendants()]
    if pids:
        _reapers.append(subprocess.Popen([sys.executable, "-c", REAPER, *pids], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True))
        # the pipe's write end stays open (referenced) in this process only: its exit is the reaper's EOF
