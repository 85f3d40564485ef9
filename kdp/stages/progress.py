"""Progress lines of an evaluation: one console line at least every `every` seconds, e.g.

    [eval] 41% (3/12 shards, 7/20 attacks), full pgd100 on at_teacher, 41.2 images/s, ~2 min left

and one when it ends. Work is counted in images scored, an image once per defense it is scored
through (a classifier-threat batch scored by 9 defenses is 9 x its images), so that a shard's
share is known before it runs (`shard_work`). The time left assumes the rate so far: an estimate.

In one process the evaluation reports each scored batch (`tick`, evaluate's on_batch); a Ray
driver sees only whole shards end (`done`). A thread (`lines`) prints between the two, so no
gap exceeds `every` even while one batch or shard runs for minutes. No Ray here.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable

from kdp.stages.shards import shards

EVERY_S = 30.0


def shard_work(cfg, n_test: int, threat: str | None, attack: str | None, start: int, stop: int | None,
               variants, surrogate: bool) -> tuple[str, dict[str, int]]:
    """(what an evaluation shard works on, 'threat attack' -> images x defenses it scores); threat
    None: the whole evaluation. Its images are Context.count's: an attack's subset of the slice."""
    items = ([(threat, attack, start, stop)] if threat is not None
             else shards(cfg, n_test, n_test, surrogate))  # one item per attack, all its images
    units: dict[str, int] = {}
    for t, a, s, e in items:
        key = f"{t} {a}"
        units[key] = units.get(key, 0) + max(0, cfg.subset(a, n_test if e is None else e) - s) * len(variants)
    return label(threat, attack, list(variants)), units


def label(threat: str | None, attack: str | None, variants) -> str:
    """What a shard or batch works on: 'full pgd100 on at_teacher', 'classifier fgsm on 9 variants'."""
    what = "every attack" if threat is None else f"{threat} {attack}"
    return f"{what} on {','.join(variants) if len(variants) <= 2 else f'{len(variants)} variants'}"


def duration(seconds: float) -> str:
    """40 s, 2 min, 1 h 5 min: as precise as an estimate deserves."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """What is done of an evaluation's shards (`items`, each `work(item)`: shard_work's pair),
    and the line that says so, printed by `say` at most once per `every` seconds."""

    def __init__(self, items: list, work: Callable, say: Callable[[str], None] = print, every: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.work, self.say, self.every, self.clock = work, say, every, clock
        self.pending = [work(i) for i in items]  # (label, {attack: units}) per unfinished shard
        self.total: dict[str, int] = {}
        for _, units in self.pending:
            for k, n in units.items():
                self.total[k] = self.total.get(k, 0) + n
        self.n_shards, self.finished, self.skipped = len(items), {k: 0 for k in self.total}, 0
        self._ticks: dict[str, int] = {}  # the running shard's batches, when it runs in this process
        self.current: str | None = None
        self.t0 = self.last = clock()
        self._lock = threading.Lock()

    def tick(self, threat: str, attack: str, variants: str, images: int) -> None:
        """One batch scored in this process (kdp.stages.evaluate's on_batch)."""
        names = variants.split(",")
        with self._lock:
            key = f"{threat} {attack}"
            self._ticks[key] = self._ticks.get(key, 0) + images * len(names)
            self.current = label(threat, attack, names)
        self.poll()

    def done(self, item, ran: bool = True) -> None:
        """Shard `item` finished (`ran` False: kept from an earlier run, not counted in the rate)."""
        what, units = self.work(item)
        with self._lock:
            self.pending.remove((what, units))
            for k, n in units.items():
                self.finished[k] += n
                self.skipped += 0 if ran else n
            self._ticks, self.current = {}, None  # the next shard's ticks start from zero
        self.poll()

    def poll(self) -> None:
        """Print the line if `every` seconds passed since the last one."""
        with self._lock:
            if self.clock() - self.last < self.every:
                return
            self.last = self.clock()
            line = self.line()
        self.say(line)

    def _done(self, key: str) -> int:
        return min(self.total[key], self.finished[key] + self._ticks.get(key, 0))

    def line(self) -> str:
        total, done = sum(self.total.values()), sum(map(self._done, self.total))
        counts = [f"{self.n_shards - len(self.pending)}/{self.n_shards} shards"] if self.n_shards > 1 else []
        if len(self.total) > 1:
            counts.append(f"{sum(self._done(k) == n for k, n in self.total.items())}/{len(self.total)} attacks")
        head = f"[eval] {100 * done // max(total, 1)}%" + (f" ({', '.join(counts)})" if counts else "")
        now = self.current or (self.pending[0][0] if self.pending else None)
        seconds = self.clock() - self.t0
        rate = (done - self.skipped) / seconds if seconds > 0 else 0.0
        if self.pending:
            left = f"~{duration((total - done) / rate)} left" if rate > 0 else "time left unknown"
            return f"{head}, {now}, {rate:.1f} images/s, {left}"
        return f"{head} in {duration(seconds)}, {rate:.1f} images/s"

    def finish(self) -> None:
        """The last line: everything done, in how long."""
        with self._lock:
            line = self.line()
        self.say(line)

    @contextlib.contextmanager
    def lines(self, check_s: float = 1.0):
        """A thread that prints each line as it falls due while the block runs, so that lines keep
        coming while a batch, or a shard elsewhere, runs longer than `every`. It looks at least
        every `check_s` seconds (an injected clock is not one it can sleep on)."""
        stop = threading.Event()

        def loop():
            while not stop.wait(min(check_s, max(0.0, self.every - (self.clock() - self.last)))):
                self.poll()
        thread = threading.Thread(target=loop, name="eval-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
