"""A fault-injecting wrapper around a real store's S3 filesystem: the calls go to the real server
(tests/s3_server.py); a test runs its own code just before a chosen call, to force an
interleaving (another writer's publish, a cleanup, a failure) exactly there."""
from __future__ import annotations


class FaultFS:
    """Delegates every call to `fs`; before a call of `method` whose first argument passes `when`,
    runs `before(*args)` (once unless `every`). `calls` records (method, first argument)."""

    def __init__(self, fs, method: str, when, before, every: bool = False):
        self._fs, self._method, self._when, self._before, self._every = fs, method, when, before, every
        self.fired, self.calls = 0, []

    def __getattr__(self, name):
        real = getattr(self._fs, name)
        if not callable(real):
            return real

        def call(*args, **kwargs):
            self.calls.append((name, args[0] if args else None))
            if name == self._method and (self._every or not self.fired) and self._when(args[0] if args else None):
                self.fired += 1
                self._before(*args)
            return real(*args, **kwargs)
        return call


def inject(store, method: str, when, before, every: bool = False) -> FaultFS:
    """Wrap `store.fs` (a kdp.bucket.BucketStorage) in a FaultFS; returns it."""
    store.fs = FaultFS(store.fs, method, when, before, every)
    return store.fs
