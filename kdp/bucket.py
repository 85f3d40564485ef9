"""An output root in a bucket (`s3://bucket/prefix`), mirrored in node-local scratch: the
bucket half of kdp.storage (see its docstring for publishing, the bucket as the truth, names
and credentials, and retries)."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from kdp.bucket_dirs import collect, pull_dir, push_dir
from kdp.bucket_io import (CHUNK, RETRY_S, SCHEMES, TIMEOUT_S, Broken, check_uri, endpoint, inside, local_write,
                           transient, why)
from kdp.flags import env_seconds
from kdp.bucket_io import scratch as node_scratch
from kdp.files import atomic_path
from kdp.errors import StorageError


class BucketStorage:
    """An output root in a bucket, mirrored in node-local scratch (see the module docstring)."""
    remote = True

    def __init__(self, uri: str, scratch: str | Path | None = None):
        import pyarrow.fs as pafs

        check_uri(uri)
        scheme = uri.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise StorageError(f"{uri}: unsupported storage scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
        timeout = env_seconds("KDP_STORE_TIMEOUT_S", TIMEOUT_S)
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
            rebuild, (options,) = self.fs.__reduce__()  # the same options, with timeouts: a stalled
            self.fs = rebuild({**options, "request_timeout": timeout,  # store never hangs a call
                               "connect_timeout": min(timeout, 10.0)})
        except Exception as e:  # pyarrow's messages name the problem; keep their first line
            raise StorageError(f"{uri}: {str(e).splitlines()[0]}") from None
        self.retry_s = env_seconds("KDP_STORE_RETRY_S", RETRY_S)
        self.uri, self.base = uri.rstrip("/"), base.rstrip("/")
        self.bucket = self.base.split("/", 1)[0]
        self.root = Path(scratch or node_scratch()).expanduser().resolve() / self.base
        self.checked = False  # preflight passed: this object does not check again

    def say(self, msg: str) -> None:
        """A line about the bucket's state that is not an error (an artifact taken as not made)."""
        print(msg, file=sys.stderr, flush=True)

    def __getstate__(self):  # to Ray workers: the URI and the mirror, never the client or its keys
        return {"uri": self.uri, "root": str(self.root)}

    def __setstate__(self, state):
        self.__init__(state["uri"])
        self.root = Path(state["root"])  # the driver's mirror path: the same on every node

    def key(self, path: Path) -> str:
        """The object key of a path in the mirror."""
        rel = Path(path).resolve().relative_to(self.root)
        return f"{self.base}/{rel.as_posix()}" if str(rel) != "." else self.base

    def uri_of(self, path: Path) -> str:
        """The bucket URI of a path in the mirror."""
        return f"{self.uri.split('://', 1)[0]}://{self.key(path)}"

    def preflight(self) -> None:
        """Fail in one line naming the URI, before any work: an unreachable endpoint, bad
        credentials, a missing bucket or no right to write (a probe object, then deleted).
        Once passed, not again for this object."""
        import pyarrow.fs as pafs

        if self.checked:
            return
        once = dict(retry_s=0.0)  # nothing is done yet: a wrong endpoint fails at once
        info = self._call(self.fs.get_file_info, self.bucket, **once)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: no bucket {self.bucket!r} at {endpoint()}")
        probe = f"{self.base}/.kdp-preflight-{uuid.uuid4().hex[:8]}"
        self._call(self._put_bytes, probe, b"", **once)
        self._call(self.fs.delete_file, probe, **once)
        self.checked = True

    def _call(self, fn, *args, retry_s: float | None = None):
        """fn(*args), retried with backoff while its error may pass, for retry_s seconds
        (default: this store's budget); then, or for any other error, one line naming the URI.
        FileNotFoundError and kdp's own errors pass through."""
        from kdp.interrupt import check

        budget = self.retry_s if retry_s is None else retry_s
        start, delay, tries = time.monotonic(), 0.5, 0
        while True:
            tries += 1
            try:
                return fn(*args)
            except (FileNotFoundError, StorageError):
                raise
            except OSError as e:
                waited = time.monotonic() - start
                if not transient(e) or waited + delay > budget:
                    more = f" (gave up after {tries} tries in {waited:.0f} s; KDP_STORE_RETRY_S sets how long)" \
                        if transient(e) and budget > 0 else ""
                    raise StorageError(f"{self.uri}: {why(e)}{more}") from None
            check()  # Ctrl-C stops the waiting
            time.sleep(delay)
            delay = min(2 * delay, 8.0)

    def exists(self, path: Path) -> bool:
        import pyarrow.fs as pafs

        return self._call(self.fs.get_file_info, self.key(path)).type != pafs.FileType.NotFound

    # ---- pull: bucket -> mirror --------------------------------------------------------------

    def pull(self, path: Path) -> bool:
        """Bring the artifact at `path` from the bucket into the mirror if the bucket has it
        finished (a file; a directory with its commit): True. Otherwise False, and a mirror
        copy is removed: the bucket is the truth."""
        import pyarrow.fs as pafs

        path = Path(path)
        info = self._call(self.fs.get_file_info, self.key(path))
        if info.type == pafs.FileType.File:  # small (configs, states, results): fetched each time
            self._download_file(path, info)
            return True
        if info.type == pafs.FileType.Directory and pull_dir(self, path):
            return True
        _drop(path)  # the bucket is the truth: what it does not hold, this node does not use
        return False

    def _download_file(self, path: Path, info, tries: int = 5) -> None:
        """A single-file artifact, read again while it is replaced under the read (its size is
        taken when the read opens, so an object overwritten meanwhile can come back torn)."""
        for _ in range(tries):
            self._download(info.path, path)
            again = self._call(self.fs.get_file_info, info.path)
            if path.stat().st_size == info.size == again.size and again.mtime_ns == info.mtime_ns:
                return
            info = again
        raise StorageError(f"{self.uri_of(path)}: the object kept changing while it was read ({tries} tries)")

    def _download(self, key: str, dest: Path, sha: str | None = None) -> str:
        """Copy one object to `dest` (by rename), refused unless its sha256 is `sha` if given;
        returns the sha256, computed while it streams. Retried as a whole (`_call`); a local
        write that fails (disk full, no permission) is named as local, not as the bucket's."""
        def once() -> str:
            h = hashlib.sha256()
            with atomic_path(dest) as tmp:
                with self.fs.open_input_stream(key) as src, local_write(tmp) as out:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                if sha is not None and h.hexdigest() != sha:
                    raise Broken(f"{self.uri.split('://', 1)[0]}://{key}: does not match the sha256 in its "
                                 "commit (changed or corrupt in the bucket)")
            return h.hexdigest()
        return self._call(once)

    def pull_tree(self, path: Path) -> None:
        """Mirror the directory `path` (small files only: a sweep's results partition): fetch every
        file (an object replaced within the same second has the same size and time), delete
        what the bucket no longer holds."""
        import pyarrow.fs as pafs

        path = Path(path)
        listing = self._call(self.fs.get_file_info, pafs.FileSelector(self.key(path), allow_not_found=True,
                                                                      recursive=True))
        remote = set()
        for f in (f for f in listing if f.type == pafs.FileType.File):
            name = f.path[len(self.key(path)):].lstrip("/")
            self._download(f.path, inside(path, name, self.uri_of(path)))
            remote.add(name)
        for p in (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else ():
            if p.relative_to(path).as_posix() not in remote:
                p.unlink()  # deleted in the bucket

    def holds(self, path) -> bool:
        """Is `path` a local path inside the mirror (an artifact of this output root)?"""
        return isinstance(path, (str, Path)) and "://" not in str(path) and Path(path).resolve().is_relative_to(self.root)

    def pull_all(self, obj) -> None:
        """Pull every artifact path in `obj` (a path, or a dict, list or tuple holding some):
        what a task on another node reads."""
        if isinstance(obj, dict):
            for v in obj.values():
                self.pull_all(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.pull_all(v)
        elif isinstance(obj, Path) and self.holds(obj):
            self.pull(obj)

    def remove(self, path: Path) -> None:
        """Delete the object of a single-file artifact (a marker), if there."""
        try:
            self._call(self.fs.delete_file, self.key(path))
        except FileNotFoundError:
            pass

    # ---- push: mirror -> bucket --------------------------------------------------------------

    def push(self, path: Path) -> None:
        """Publish the artifact at `path`: a file in one PUT; a directory's files, then its
        manifest last (nothing is uploaded again that the bucket's manifest already lists)."""
        path = Path(path)
        if path.is_file():
            self._call(self._upload, path, self.key(path))
        elif path.is_dir():
            push_dir(self, path)

    def collect(self, path: Path, keep: str, grace_s: float | None = None) -> list[str]:
        """Delete a directory artifact's old versions (kdp.bucket_dirs.collect)."""
        return collect(self, path, keep, grace_s)

    def _upload(self, src: Path, key: str) -> None:
        with open(src, "rb") as f, self.fs.open_output_stream(key) as out:
            while chunk := f.read(CHUNK):
                out.write(chunk)

    def _upload_at(self, fd: int, name: str, key: str) -> tuple[int, str]:
        """Upload the file `name` of the directory open as `fd`; the size and sha256 of the bytes
        sent (what a commit must say of the object)."""
        h, size = hashlib.sha256(), 0
        with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f, self.fs.open_output_stream(key) as out:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return size, h.hexdigest()

    def _put_bytes(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(key) as out:
            out.write(data)


def _drop(path: Path) -> None:
    """Remove a mirror copy (file or directory) the bucket does not hold."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
