"""Directory artifacts in a bucket (a checkpoint, an AE cache entry): immutable versions and the
commit that names one. The half of kdp.bucket that says when a directory is finished.

- A publish uploads the files under a version of its own, `<dir>/.kdp-v/<hash>-<nonce>/`
  (the hash of their names, sizes and sha256s, then a nonce per publish: two writers never
  share a key), then PUTs the commit, `<dir>/.kdp-manifest.json`, naming the version and every
  file's size and sha256. Each file's sha256 is the one of the bytes actually uploaded (read
  through one open handle of the directory), so a commit always describes its objects; a file
  changed under the upload (another process on this node) makes the publish start over.
- A commit is checked after it is PUT, and a commit equal to the local files is skipped only
  once its objects are there, of their size and not written after it. Otherwise the missing or
  changed objects are uploaded again and the commit PUT again: a writer paused past the cleanup
  grace, or objects deleted or overwritten behind kdp's back, heal on the next publish.
- A reader that finds a commit corrupt, or its files gone or failing their sha256 (after one
  more read of the commit), takes the artifact as not made and says so in one line: its stage
  is made again and publishes a new commit. Nothing is broken for good.
- A pull builds the new copy beside the old one and swaps it in whole: an interrupted pull
  leaves the old copy and its commit as they were, never files of two versions.
- Cleanup reads the commit again before each delete and never deletes the version it names.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from kdp.bucket_io import CHUNK, COMMIT_MAX, GRACE_S, MANIFEST, VERSIONS, Broken, inside
from kdp.errors import StorageError
from kdp.files import atomic_dir, file_sha256


class Changed(StorageError):
    """A file changed while it was uploaded (another process writes this node's mirror)."""


def read_commit(store, path: Path) -> dict | None:
    """The commit of a directory artifact, None if it has none; Broken if it is corrupt, too
    large or names a file outside its directory."""
    key = f"{store.key(path)}/{MANIFEST}"

    def read():
        with store.fs.open_input_stream(key) as f:
            return f.read(COMMIT_MAX + 1)
    try:
        raw = store._call(read)
    except FileNotFoundError:
        return None
    where = f"{store.uri_of(path)}/{MANIFEST}"
    if len(raw) > COMMIT_MAX:
        raise Broken(f"{where}: a commit larger than {COMMIT_MAX >> 20} MiB")
    try:
        commit = json.loads(raw)
        files, version = commit["files"], commit.get("version", "")
        ok = isinstance(files, dict) and isinstance(version, str) and all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
            for v in files.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise Broken(f"{where}: a corrupt commit")
    if "/" in version or version.startswith(".") or "\0" in version:
        raise Broken(f"{where}: refused the version {version!r}")
    for name in files:
        try:
            inside(path, name, where)
        except StorageError as e:
            raise Broken(str(e)) from None
    return commit


def file_key(store, path: Path, commit: dict, name: str) -> str:
    """Where a committed file is: under its version (before versions: beside the commit)."""
    version = commit.get("version")
    return f"{store.key(path)}/{VERSIONS}/{version}/{name}" if version else f"{store.key(path)}/{name}"


# ---- pull ------------------------------------------------------------------------------------

def pull_dir(store, path: Path) -> bool:
    """Make the mirror's copy of `path` the bucket's committed version: True. False when the
    bucket has no commit, or a broken one (said in one line): the artifact is not made."""
    for attempt in range(2):  # a file gone may be a version replaced meanwhile: read the commit again
        try:
            commit = read_commit(store, path)
            if commit is None:
                return False
            _mirror(store, path, commit)
            return True
        except FileNotFoundError:
            broken = Broken(f"{store.uri_of(path)}: the files its commit names are gone")
        except Broken as e:
            broken = e
    store.say(f"[storage] {broken}; taken as not made: its stage is made again")
    return False


def _mirror(store, path: Path, commit: dict) -> None:
    if read_local(path / MANIFEST) == commit and _holds_only(path, commit):
        return  # this node has it already
    if _record_in_place(path, commit):
        return
    with atomic_dir(path) as tmp:  # the old copy stays whole until the new one replaces it
        for name, (size, sha) in commit["files"].items():
            dest, old = inside(tmp, name, store.uri_of(path)), path / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if old.is_file() and old.stat().st_size == size and file_sha256(old) == sha:
                _link(old, dest)
            else:
                store._download(file_key(store, path, commit, name), dest, sha)
        (tmp / MANIFEST).write_text(json.dumps(commit, sort_keys=True))


def _record_in_place(path: Path, commit: dict) -> bool:
    """The copy holds exactly the committed bytes but not the commit (its maker on this node is
    between its commit and the local copy of it): record the commit into that very directory.
    Swapping in a copy would pull the directory from under the maker's publish."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        if snapshot(fd) != commit["files"]:
            return False
        _write_local_commit(fd, commit)
        return True
    except OSError:  # replaced or removed meanwhile: mirror it whole
        return False
    finally:
        os.close(fd)


def _holds_only(path: Path, commit: dict) -> bool:
    """Does the local copy hold exactly the committed files (no file another version left)?"""
    here = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    return here == set(commit["files"])


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        import shutil

        shutil.copyfile(src, dest)


def read_local(path: Path) -> dict | None:
    """A local JSON record of ours (a mirror's commit copy or index), None if missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- push ------------------------------------------------------------------------------------

def push_dir(store, path: Path, tries: int = 3) -> None:
    """Publish the directory `path` as a new version and its commit (module docstring)."""
    for _ in range(tries):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # replaced meanwhile (a whole-directory rename): publish the new one
        try:
            commit = _publish(store, path, fd)
            _write_local_commit(fd, commit)
            return
        except (Changed, FileNotFoundError):
            continue  # another process replaced the directory under the upload: start over
        finally:
            os.close(fd)
    raise StorageError(f"{path}: kept changing while it was published ({tries} tries): another process on this "
                       "node writes it (give each process its own KDP_SCRATCH)")


def _publish(store, path: Path, fd: int) -> dict:
    files = snapshot(fd)
    try:
        there = read_commit(store, path)
    except Broken:  # this publish replaces it
        there = None
    if there is not None and there["files"] == files:
        commit = there  # the same files: keep that version, once its objects are checked
    else:
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        commit = {"files": files, "version": f"{digest}-{uuid.uuid4().hex[:8]}"}
        _upload_all(store, path, fd, commit, list(files))
        _put_commit(store, path, commit)
    for _ in range(3):
        stale = stale_objects(store, path, commit)
        if not stale:
            break
        _upload_all(store, path, fd, commit, stale)  # deleted or overwritten since: heal them
        _put_commit(store, path, commit)
    else:
        raise StorageError(f"{store.uri_of(path)}: its objects keep disappearing after each commit (3 tries)")
    collect(store, path, keep=commit.get("version", ""))
    return commit


def snapshot(fd: int) -> dict[str, list]:
    """{name: [size, sha256]} of the files under the directory open as `fd` (kdp's own hidden
    and temporary files left out)."""
    files = {}
    for top, dirs, names, dfd in os.fwalk(".", dir_fd=fd):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name == MANIFEST or name.startswith(".") or ".tmp-" in name:
                continue
            h, size = hashlib.sha256(), 0
            with open(os.open(name, os.O_RDONLY, dir_fd=dfd), "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            files[os.path.normpath(os.path.join(top, name))] = [size, h.hexdigest()]
    return dict(sorted(files.items()))


def snapshot_of(path: Path) -> dict[str, list]:
    """snapshot() of the directory at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return snapshot(fd)
    finally:
        os.close(fd)


def _upload_all(store, path: Path, fd: int, commit: dict, names: list[str]) -> None:
    for name in names:
        size, sha = store._call(store._upload_at, fd, name, file_key(store, path, commit, name))
        if [size, sha] != commit["files"][name]:
            raise Changed(f"{path / name}: changed while it was uploaded")


def _put_commit(store, path: Path, commit: dict) -> None:
    store._call(store._put_bytes, f"{store.key(path)}/{MANIFEST}", json.dumps(commit, sort_keys=True).encode())


def stale_objects(store, path: Path, commit: dict) -> list[str]:
    """The committed files whose objects are missing, of another size, or written after the
    commit (versions are written once, before their commit: a later write is not kdp's)."""
    import pyarrow.fs as pafs

    names = list(commit["files"])
    infos = store._call(store.fs.get_file_info, [f"{store.key(path)}/{MANIFEST}",
                                                 *(file_key(store, path, commit, n) for n in names)])
    committed = infos[0].mtime_ns or 0
    return [n for n, info in zip(names, infos[1:]) if info.type != pafs.FileType.File
            or info.size != commit["files"][n][0] or (info.mtime_ns or 0) > committed]


def _write_local_commit(fd: int, commit: dict) -> None:
    """The local copy of the commit, into the very directory that was published (whatever the
    path names now): a node never pairs a commit with files it does not describe."""
    tmp = f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
    try:
        os.write(out, json.dumps(commit, sort_keys=True).encode())
        os.fsync(out)
    finally:
        os.close(out)
    os.replace(tmp, MANIFEST, src_dir_fd=fd, dst_dir_fd=fd)


# ---- cleanup ---------------------------------------------------------------------------------

def collect(store, path: Path, keep: str, grace_s: float | None = None) -> list[str]:
    """Delete the versions of a directory artifact other than `keep` whose files are all older
    than grace_s (younger ones may be another writer's upload, not yet committed), reading the
    commit again before each delete: the version it names is never deleted."""
    import time

    import pyarrow.fs as pafs

    grace_s = GRACE_S if grace_s is None else grace_s
    root = f"{store.key(path)}/{VERSIONS}"
    listing = store._call(store.fs.get_file_info, pafs.FileSelector(root, allow_not_found=True, recursive=True))
    newest: dict[str, float] = {}
    for f in listing:
        version = f.path[len(root):].lstrip("/").split("/", 1)[0]
        if f.type == pafs.FileType.File and version != keep:
            newest[version] = max(newest.get(version, 0.0), (f.mtime_ns or 0) / 1e9)
    gone = []
    for v in (v for v, t in newest.items() if time.time() - t > grace_s):
        if _committed_version(store, path) == v:
            continue  # committed since the listing (a writer republished): kept
        try:
            store._call(store.fs.delete_dir, f"{root}/{v}")
        except FileNotFoundError:
            pass
        gone.append(v)
    return gone


def _committed_version(store, path: Path) -> str | None:
    try:
        commit = read_commit(store, path)
    except Broken:
        return None
    return None if commit is None else commit.get("version")

