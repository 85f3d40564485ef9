"""Where kdp's artifacts live: a local directory, or a bucket (`s3://bucket/prefix`).

kdp's stages read and write local paths. With a bucket output, each process works in a
node-local mirror of the output root (`KDP_SCRATCH`, default ~/.cache/kdp/mirror, then
<bucket>/<prefix>) and this layer moves artifacts between the mirror and the bucket at the
stage boundaries (`kdp.scheduler.run_stage`): an artifact is pulled before its stage is asked
whether it is done, and pushed once it is made. The stages know nothing of buckets.

Publishing, so that a reader never takes a half-written or mixed artifact for finished, and no
commit stays broken (kdp.bucket_dirs says how):
- a directory (a checkpoint, an AE cache entry) is published as an immutable version under
  `<dir>/.kdp-v/<hash>-<nonce>/`, then one PUT of the commit, `<dir>/.kdp-manifest.json`,
  naming the version and every file's size and sha256 (of the bytes sent). A commit's objects
  are checked after its PUT and before a publish is skipped, and healed; a reader that finds a
  commit broken takes the artifact as not made (one line), and the stage is made again. A pull
  swaps the whole copy in: never files of two versions;
- a single file (a results parquet, a training state, an event file) is one PUT: an object
  appears whole or not at all.
The bucket is the truth: a mirror copy of an artifact the bucket does not hold (any more) is
dropped, a directory's local files that its commit does not list are removed, and `pull_tree`
mirrors deletions. Every name read from the bucket (a commit's file names, a listing's keys)
must resolve inside its directory, else it is refused. A URI with credentials in it
(`s3://key:secret@bucket`, whatever the secret holds) is refused without echoing the secret, and
no kdp error line carries a URI's secret (kdp.errors.redact).

Every store call is retried with backoff on errors that can pass (unreachable endpoint,
timeouts, 5xx, throttling) for KDP_STORE_RETRY_S seconds (default 120: a store restart rides
through); after that, one line naming the URI, and the same command resumes. Preflight does not
retry: a wrong endpoint fails at once. A request that moves no byte for KDP_STORE_TIMEOUT_S
seconds (default 30) fails and is retried, so no call hangs.

Endpoint and credentials come from pyarrow's S3 filesystem, which reads the standard AWS
variables and files (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws/config, instance roles). kdp stores none of them: not in rows, logs or checkpoints.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from kdp.bucket import BucketStorage
from kdp.bucket_io import MANIFEST, check_uri, inside  # noqa: F401 (re-exported)
from kdp.errors import StorageError


@runtime_checkable
class Storage(Protocol):
    """An output root, the one interface the scheduler and every worker use: LocalStorage (a
    directory every node mounts) or kdp.bucket.BucketStorage (a bucket, mirrored per node).
    Paths are local ones under `root`; a bucket's calls move them between mirror and bucket."""
    uri: str
    """The root as the user gave it (a path, or s3://bucket/prefix): what messages name."""
    root: Path
    """The local directory the stages write under (a bucket's: this node's mirror of it)."""
    remote: bool
    """Does anything move (a bucket), or are the artifacts where the stages write them?"""

    def preflight(self) -> None:
        """Refuse an unusable root in one line before any work (once per object)."""

    def pull(self, path: Path) -> bool:
        """Make the artifact at `path` current here, if the root holds it; is it here now?"""

    def push(self, path: Path) -> None:
        """Publish the artifact at `path` (a directory as one commit, a file as one object)."""

    def pull_all(self, obj) -> None:
        """pull() every artifact path found in `obj` (a task's arguments)."""

    def pull_tree(self, path: Path) -> None:
        """Mirror a whole subtree (deletions too)."""

    def remove(self, path: Path) -> None:
        """Delete the artifact at `path` from the root."""

    def holds(self, path) -> bool:
        """Is `path` an artifact under this root that a worker must publish?"""

    def exists(self, path: Path) -> bool:
        """Does the root hold `path`?"""

    def uri_of(self, path: Path):
        """`path` as the root's own address (a bucket URI, or the path)."""


def publish_quietly(store: Storage, path: Path, log=print) -> None:
    """push() where an error is already on its way (a `finally`, an except): a storage failure
    is logged, never raised over the original error or a Ctrl-C."""
    try:
        store.push(path)
    except StorageError as e:
        log(f"[storage] could not publish {path} while stopping: {e}")


class Publisher:
    """Publishes one path from a thread of its own while the caller goes on: a stage keeps
    training while the push of its last epoch's state waits on a slow or paused store.
    Requests coalesce (the newest wins: a state superseded before its upload began is not
    uploaded). A failed push (the store's retry budget spent) is raised by the next request or
    by close(), never lost; close() waits for the push in flight, which that budget bounds."""

    def __init__(self, store, path: Path):
        self.store, self.path = store, Path(path)
        self._cv = threading.Condition()
        self._wanted = self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"kdp-publish-{self.path.name}", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Publish the path as it is now (or later, if a push is in flight); returns at once."""
        with self._cv:
            self._raise()
            self._wanted = True
            self._cv.notify_all()

    def close(self, quietly: bool = False, log=print) -> None:
        """Wait for the requested pushes; their error is raised, or with `quietly` (an error is
        already on its way) logged."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        error, self._error = self._error, None
        if error is not None and not quietly:
            raise error
        if error is not None:
            log(f"[storage] could not publish {self.path} while stopping: {error}")

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._wanted or self._closed):
                    self._cv.wait()
                if not self._wanted:
                    return
                self._wanted = False
            try:
                self.store.push(self.path)
            except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
                with self._cv:
                    self._error = self._error or e


@contextmanager
def publishing_each(store, path: Path):
    """A Publisher of `path` for the block (None for a local store: nothing to publish); closed
    at its end, quietly when the block raised (kdp.storage.publish_quietly's rule)."""
    if store is None or not store.remote:
        yield None
        return
    pub, ok = Publisher(store, path), False
    try:
        yield pub
        ok = True
    finally:
        pub.close(quietly=not ok)


def is_uri(where) -> bool:
    """Is `where` a URI (scheme://...) rather than a local path?"""
    return "://" in str(where)


def local_only(where, what: str) -> Path:
    """`where` as a local path; a URI is refused in one line (never turned into `s3:/...`)."""
    if is_uri(where):
        raise StorageError(f"{where}: {what} takes a local path; bucket URIs are supported by kdp run, kdp sweep, "
                           "kdp report and kdp.results.load (docs/object-storage.md)")
    return Path(where).expanduser().resolve()


class LocalStorage:
    """A local (or shared POSIX) output root: artifacts are where the stages write them."""
    remote = False

    def __init__(self, root):
        self.uri = str(root)
        self.root = Path(root).expanduser().resolve()
        self.checked = False  # preflight passed: this object does not check again

    def preflight(self) -> None:
        """The root can be made and written (a probe file, then removed): no permission, a
        read-only or full disk, a file in the way: one line naming the root, before any work.
        Once passed, not again for this object."""
        if self.checked:
            return
        probe = self.root / f".kdp-preflight-{os.getpid()}"
        made = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StorageError(f"{self.uri}: cannot write the output root ({e.strerror or e})") from None
        finally:
            probe.unlink(missing_ok=True)
            for p in made:  # nothing is left behind before the run itself writes
                if p.is_dir():
                    p.rmdir()
        self.checked = True

    def pull(self, path: Path) -> bool:
        return Path(path).exists()

    def push(self, path: Path) -> None:
        """Nothing to publish: it is there."""

    def pull_all(self, obj) -> None:
        """Nothing to fetch."""

    def remove(self, path: Path) -> None:
        """Nothing to remove but the file itself (the caller's)."""

    def holds(self, path) -> bool:
        return False

    def exists(self, path: Path) -> bool:
        return Path(path).exists()

    def pull_tree(self, path: Path) -> None:
        """Nothing to fetch."""

    def uri_of(self, path: Path) -> Path:
        return Path(path)


def open_storage(where, scratch=None) -> Storage:
    """The storage of an output root: a bucket for a URI, else the local directory (a storage
    is returned as it is: a worker keeps the driver's mirror path)."""
    if isinstance(where, (LocalStorage, BucketStorage)):
        return where
    return BucketStorage(str(where), scratch) if is_uri(where) else LocalStorage(where)


