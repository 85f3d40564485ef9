"""Crash-safe writes, the bottom of every artifact: a file or a directory is written under a
temporary name, flushed and renamed into place, so a crash or a power loss never leaves half
of one; a write the disk refuses (no space, read-only, no permission, a file in the way) is one
line naming the directory and the cause (`DiskError`), with nothing of it left; JSON read back
with one-line errors; a file's sha256."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from kdp.errors import CheckpointError, disk_errors


def fsync(path: Path) -> None:
    """Flush a file's or a directory's data to the disk: after a power loss a renamed file is
    then whole, never the empty file a rename of unflushed data can leave."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success flush it, rename it over `path`
    and flush the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with disk_errors(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            fsync(tmp)
            os.replace(tmp, path)
            fsync(path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path, what: str = "file") -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


@contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary directory; on success it replaces `path` whole.

    If `path` appears meanwhile (another process won a race), the existing one is kept
    and ours discarded: both hold the same content by construction (cache entries).
    """
    path = Path(path)
    with disk_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()  # replace only what was there before; keep one that appears meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            for p in [*(p for p in tmp.rglob("*") if p.is_file()), tmp]:
                fsync(p)
            old = None
            if existed and path.exists():
                old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise
            fsync(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
