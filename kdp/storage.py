"""Where kdp's artifacts live: a local directory, or a bucket (`s3://bucket/prefix`).

kdp's stages read and write local paths. With a bucket output, each process works in a
node-local mirror of the output root (`KDP_SCRATCH`, default ~/.cache/kdp/mirror, then
<bucket>/<prefix>) and this layer moves artifacts between the mirror and the bucket at the
stage boundaries (`kdp.graph.run_stage`): an artifact is pulled before its stage is asked
whether it is done, and pushed once it is made. The stages know nothing of buckets.

Publishing, so that a reader never takes a half-written artifact for finished:
- a directory (a checkpoint, an AE cache entry) is uploaded file by file and then its
  manifest, `.kdp-manifest.json` (each file's size and sha256), last. A reader takes a
  directory as present only once its manifest exists, checks every file it downloads against
  it, and writes its local copy of the manifest last; a local copy whose manifest matches the
  bucket's is not downloaded again (once per node);
- a single file (a results parquet, a training state, an event file) is one PUT: an object
  appears whole or not at all.

Endpoint and credentials come from pyarrow's S3 filesystem, which reads the standard AWS
variables and files (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws/config, instance roles). kdp stores none of them: not in rows, logs or checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from kdp.checkpoint import atomic_path, file_sha256
from kdp.errors import NotFoundError, StorageError

SCHEMES = ("s3",)
MANIFEST = ".kdp-manifest.json"
CHUNK = 8 << 20


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

    def preflight(self) -> None:
        """Nothing to check before the run (the directory is made by the run)."""

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


class BucketStorage:
    """An output root in a bucket, mirrored in node-local scratch (see the module docstring)."""
    remote = True

    def __init__(self, uri: str, scratch: str | Path | None = None):
        import pyarrow.fs as pafs

        scheme = uri.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise StorageError(f"{uri}: unsupported storage scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except Exception as e:  # pyarrow's messages name the problem; keep their first line
            raise StorageError(f"{uri}: {str(e).splitlines()[0]}") from None
        self.uri, self.base = uri.rstrip("/"), base.rstrip("/")
        self.bucket = self.base.split("/", 1)[0]
        self.root = Path(scratch or _scratch()).expanduser().resolve() / self.base

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
        credentials, a missing bucket or no right to write (a probe object, then deleted)."""
        import pyarrow.fs as pafs

        info = self._call(self.fs.get_file_info, self.bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: no bucket {self.bucket!r} at {endpoint()}")
        probe = f"{self.base}/.kdp-preflight-{uuid.uuid4().hex[:8]}"
        self._call(self._put_bytes, probe, b"")
        self._call(self.fs.delete_file, probe)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise StorageError(f"{self.uri}: {_why(e)}") from None

    def exists(self, path: Path) -> bool:
        import pyarrow.fs as pafs

        return self._call(self.fs.get_file_info, self.key(path)).type != pafs.FileType.NotFound

    # ---- pull: bucket -> mirror --------------------------------------------------------------

    def pull(self, path: Path) -> bool:
        """Bring the artifact at `path` from the bucket into the mirror if the bucket has it
        finished (a file; a directory with its manifest). True if `path` is there afterwards."""
        import pyarrow.fs as pafs

        path = Path(path)
        info = self._call(self.fs.get_file_info, self.key(path))
        if info.type == pafs.FileType.File:  # small (configs, states, results): fetched each time
            self._download(self.key(path), path)
            return True
        if info.type == pafs.FileType.Directory:
            manifest = self._read_manifest(path)
            if manifest is not None:
                self._pull_dir(path, manifest)
                return True
        return path.exists()

    def _read_manifest(self, path: Path) -> dict | None:
        try:
            with self.fs.open_input_stream(f"{self.key(path)}/{MANIFEST}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"{self.uri}: {_why(e)}") from None

    def _pull_dir(self, path: Path, manifest: dict) -> None:
        local = path / MANIFEST
        if local.is_file() and json.loads(local.read_text()) == manifest:
            return  # this node has it already
        for name, (size, sha) in manifest["files"].items():
            dest = path / name
            if dest.is_file() and dest.stat().st_size == size and file_sha256(dest) == sha:
                continue
            self._download(f"{self.key(path)}/{name}", dest, sha)
        with atomic_path(local) as tmp:  # last: the local copy is complete
            tmp.write_text(json.dumps(manifest, sort_keys=True))

    def _download(self, key: str, dest: Path, sha: str | None = None) -> str:
        """Copy one object to `dest` (by rename), refused unless its sha256 is `sha` if given;
        returns the sha256, computed while it streams."""
        h = hashlib.sha256()
        with atomic_path(dest) as tmp:
            try:
                with self.fs.open_input_stream(key) as src, open(tmp, "wb") as out:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            except OSError as e:
                raise StorageError(f"{self.uri}: {_why(e)}") from None
            if sha is not None and h.hexdigest() != sha:
                raise StorageError(f"{self.uri}: {key} does not match the sha256 in its manifest "
                                   "(changed or corrupt in the bucket)")
        return h.hexdigest()

    def pull_tree(self, path: Path) -> None:
        """Fetch every file under the directory `path` that the mirror lacks or has at another
        size (small files only: a sweep's results partition)."""
        import pyarrow.fs as pafs

        listing = self._call(self.fs.get_file_info, pafs.FileSelector(self.key(path), allow_not_found=True,
                                                                      recursive=True))
        for f in listing:
            dest = Path(path) / f.path[len(self.key(path)):].lstrip("/")
            if f.type == pafs.FileType.File and not (dest.is_file() and dest.stat().st_size == f.size):
                self._download(f.path, dest)

    def holds(self, path) -> bool:
        """Is `path` a local path inside the mirror (an artifact of this output root)?"""
        return isinstance(path, (str, Path)) and not is_uri(path) and Path(path).resolve().is_relative_to(self.root)

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
            self.fs.delete_file(self.key(path))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"{self.uri}: {_why(e)}") from None

    # ---- push: mirror -> bucket --------------------------------------------------------------

    def push(self, path: Path) -> None:
        """Publish the artifact at `path`: a file in one PUT; a directory's files, then its
        manifest last (nothing is uploaded again that the bucket's manifest already lists)."""
        path = Path(path)
        if path.is_file():
            self._call(self._upload, path, self.key(path))
        elif path.is_dir():
            self._push_dir(path)

    def _push_dir(self, path: Path) -> None:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST
                       and not p.name.startswith(".") and ".tmp-" not in p.name)
        manifest = {"files": {p.relative_to(path).as_posix(): [p.stat().st_size, file_sha256(p)] for p in files}}
        there = self._read_manifest(path) or {"files": {}}
        if there == manifest:
            return
        for name, entry in manifest["files"].items():
            if there["files"].get(name) != entry:
                self._call(self._upload, path / name, f"{self.key(path)}/{name}")
        self._call(self._put_bytes, f"{self.key(path)}/{MANIFEST}", json.dumps(manifest, sort_keys=True).encode())
        with atomic_path(path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, sort_keys=True))

    def _upload(self, src: Path, key: str) -> None:
        with open(src, "rb") as f, self.fs.open_output_stream(key) as out:
            while chunk := f.read(CHUNK):
                out.write(chunk)

    def _put_bytes(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(key) as out:
            out.write(data)


def open_storage(where, scratch=None) -> LocalStorage | BucketStorage:
    """The storage of an output root: a bucket for a URI, else the local directory (a storage
    is returned as it is: a worker keeps the driver's mirror path)."""
    if isinstance(where, (LocalStorage, BucketStorage)):
        return where
    return BucketStorage(str(where), scratch) if is_uri(where) else LocalStorage(where)


def _scratch() -> Path:
    """This node's scratch: KDP_SCRATCH, else ~/.cache/kdp/mirror."""
    return Path(os.environ.get("KDP_SCRATCH") or Path.home() / ".cache" / "kdp" / "mirror")


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"


def _why(e: OSError) -> str:
    """One line from pyarrow's S3 error: unreachable endpoint, credentials refused, or as said."""
    msg = str(e)
    if "NETWORK_CONNECTION" in msg or "Could not connect" in msg or "Could not resolve" in msg:
        return f"cannot reach the endpoint {endpoint()}"
    if "ACCESS_DENIED" in msg or "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg or "403" in msg:
        return ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or the instance role)")
    return msg.splitlines()[0]


def fetch_data(uri: str) -> Path:
    """A dataset in a bucket (a .zip object, or a prefix such as .../cifar-10-batches-py/),
    downloaded once per node into $KDP_SCRATCH/data/<bucket>/<prefix> under a lock. Each
    file's size and sha256 go into a local manifest written last; a later use checks the local
    files against it (and against the bucket's sizes) before trusting them, else downloads
    again. Returns the local path (the file, or the directory)."""
    import pyarrow.fs as pafs

    from kdp.locks import held

    store = BucketStorage(uri, _scratch() / "data")
    info = store._call(store.fs.get_file_info, store.base)
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(f"--data-dir {uri}: no such object or prefix at {endpoint()}")
    listing = [info] if info.type == pafs.FileType.File else [
        f for f in store._call(store.fs.get_file_info, pafs.FileSelector(store.base, recursive=True))
        if f.type == pafs.FileType.File]
    names = {f.path[len(store.base):].lstrip("/") or Path(store.base).name: f for f in listing}
    top = store.root.parent if info.type == pafs.FileType.File else store.root
    manifest = top / (f".{store.root.name}{MANIFEST}" if info.type == pafs.FileType.File else MANIFEST)
    top.mkdir(parents=True, exist_ok=True)
    with held(top / f".{store.root.name}.fetch.lock", f"fetching {uri}"):
        if not _fetched(top, manifest, names):
            files = {}
            for name, f in sorted(names.items()):
                files[name] = [f.size, store._download(f.path, top / name)]  # hashed as it streams
            with atomic_path(manifest) as tmp:  # last: the local copy is complete
                tmp.write_text(json.dumps({"uri": uri, "files": files}, sort_keys=True))
    return store.root


def _fetched(top: Path, manifest: Path, names: dict) -> bool:
    """Does the local copy hold every listed file, of the bucket's size and the sha256 recorded?"""
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return set(files) == set(names) and all(
        files[n][0] == f.size and (top / n).is_file() and (top / n).stat().st_size == f.size
        and file_sha256(top / n) == files[n][1] for n, f in names.items())
