"""Locks through Ray, for a sweep whose output root is a bucket (kdp.storage).

A sweep's shared artifacts (classifier, teachers, training AEs) are made by the first trial
that needs them while the others wait (`kdp.ensure.ensure`). On a shared filesystem an flock
does it (`kdp.locks.held`); object storage has none, and the mirror each node keeps is its
own. So the sweep's driver owns one small actor, a table of leases, and every trial on every
node asks it (`RayLocks.held`, the same signature as `kdp.locks.held`).

Failure cases:
- a holder that dies (its process, its node): it stops renewing its lease (every LEASE_S / 4),
  which lapses after LEASE_S; the next waiter takes the lock and makes the artifact, resuming
  from the state the dead holder published each epoch;
- a stale lock: the table lives in the driver's actor and dies with the sweep's driver, so no
  lock outlives a sweep; `--resume` starts with an empty table;
- a holder alive but cut off from the table for longer than LEASE_S (a partition), or whose
  renewal finds another holder: it knows its lease is lost and raises `LeaseLost` when its
  block ends, before it publishes; the new holder publishes its own. Had both published,
  each would still be a whole version (kdp.storage), never a mixed checkpoint.
Two sweeps (two drivers) on one bucket prefix do not share a table: give them different
sweep names, or a shared filesystem.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path

import ray

from kdp.locks import POLL_S, LockTimeout

LEASE_S = 60.0


@ray.remote(num_cpus=0)
class LeaseTable:
    """key -> its holder's token, name and lease end; a lapsed lease is free."""

    def __init__(self):
        self.leases: dict[str, dict] = {}

    def acquire(self, key: str, token: str, who: str, lease_s: float) -> dict | None:
        """Take or renew the lease; None if held now by `token`, else the holder's record."""
        now, h = time.time(), self.leases.get(key)
        if h is not None and h["token"] != token and h["until"] > now:
            return h
        since = h["since"] if h is not None and h["token"] == token else now
        self.leases[key] = {"token": token, "who": who, "since": since, "until": now + lease_s}
        return None

    def release(self, key: str, token: str) -> None:
        if self.leases.get(key, {}).get("token") == token:
            del self.leases[key]


def _phrase(h: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
    return f"{h['who'] or 'no name'} since {since}"


class RayLocks:
    """`held(path, who, timeout_s, on_wait)` backed by a LeaseTable (picklable: Tune ships it
    to every trial)."""

    def __init__(self, table=None, lease_s: float = LEASE_S):
        self.table, self.lease_s = table or LeaseTable.remote(), lease_s

    @contextlib.contextmanager
    def held(self, path: Path, who: str = "", timeout_s: float | None = None, on_wait=None):
        key, token = str(path), uuid.uuid4().hex
        who = f"host {socket.gethostname()} ({who or 'no name'})"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited = False
        while (h := ray.get(self.table.acquire.remote(key, token, who, self.lease_s))) is not None:
            if not waited and on_wait is not None:
                on_wait(_phrase(h))
            waited = True
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(f"{path}: still locked after {timeout_s:g}s by {_phrase(h)}")
            time.sleep(POLL_S)
        done, lost = threading.Event(), []
        renew = threading.Thread(target=self._renew, args=(key, token, who, done, lost), daemon=True)
        renew.start()
        try:
            yield
        finally:
            done.set()
            renew.join()
            self.table.release.remote(key, token)
        if lost:  # only when the block ended well: an error on its way stays the one raised
            raise LeaseLost(f"{path}: the lease was lost ({lost[0]}) while this process made it; not publishing "
                            "it (the holder now makes and publishes its own)")

    def _renew(self, key: str, token: str, who: str, done: threading.Event, lost: list) -> None:
        """Renew every lease_s / 4; a renewal that finds another holder, or none that succeeds for
        a whole lease (the table unreachable), means the lease is lost."""
        last = time.monotonic()
        while not done.wait(self.lease_s / 4):
            try:
                h = ray.get(self.table.acquire.remote(key, token, who, self.lease_s), timeout=self.lease_s / 4)
            except ray.exceptions.GetTimeoutError:
                if time.monotonic() - last > self.lease_s:
                    lost.append(f"no renewal for {self.lease_s:g}s")
                    return
                continue
            if h is not None:
                lost.append(f"now held by {_phrase(h)}")
                return
            last = time.monotonic()


class LeaseLost(LockTimeout):
    """A lease holder found, when its block ended, that another process holds the lease now."""
