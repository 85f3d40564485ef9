"""What kdp reports as bad input. A `KdpError` is named in one line with exit code 2 by `kdp`
and the jobs (`kdp.commands.run_errors`); anything else is a bug or a failure of the machine and
keeps its traceback, on the console and in the run's event log, with exit code 1.

Each type also derives from the builtin a caller would catch (ValueError, FileNotFoundError,
RuntimeError, TimeoutError), so library users keep their except clauses."""
from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

# a URI's userinfo secret (`scheme://user:SECRET@host`): everything up to the `@`, slashes and
# colons included (about half of AWS secret keys hold a `/`)
_SECRET = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):[^@\s]*@")


def redact(text: str) -> str:
    """`text` with the secret of every URI in it replaced: `s3://KEY:***@bucket/...`,
    `http://user:***@host`, whatever characters the secret holds."""
    return _SECRET.sub(r"\g<head>:***@", text)


class KdpError(Exception):
    """Bad input, checked before any work starts wherever it can be. Its message never carries
    a URI's secret (`redact`): it is printed, logged and written to event files."""

    def __init__(self, *args):
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class ConfigError(KdpError, ValueError):
    """A config value, flag, preset, registry name or run name that is not valid."""


class DataError(KdpError, ValueError):
    """A dataset, sweep file or results location that is missing or unreadable."""


class NotFoundError(DataError, FileNotFoundError):
    """A file or directory the input names that does not exist."""


class CheckpointError(KdpError, ValueError):
    """A checkpoint or cache entry that is missing, incomplete, corrupt or made with another config."""


class DiskError(KdpError, OSError):
    """A local directory kdp cannot write: no space, read-only, no permission, a file in the way."""


class StorageError(KdpError, RuntimeError):
    """Storage the job writes to that a node cannot see, or that another process holds too long."""


class TrackingError(KdpError, RuntimeError):
    """An experiment tracker (--mlflow) that refused or did not answer."""


CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "a read-only file system", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file is in the way",
          errno.EEXIST: "a file is in the way", errno.EISDIR: "a directory is in the way",
          errno.EFBIG: "file too large for the file system"}
SHORT_WRITE = ("requested and", "file write failed", "unexpected pos")  # numpy's and torch's words for ENOSPC


def disk_error(e: BaseException, where: Path) -> DiskError | None:
    """`e` as one line naming the directory `where` and the cause, if it is the disk's refusal
    (an errno above, or a library's short write); None for anything else (a bug keeps its traceback)."""
    if isinstance(e, OSError) and e.errno in CAUSES:
        cause = CAUSES[e.errno]
        if e.errno in (errno.ENOTDIR, errno.EEXIST) and e.filename:  # name the file in the way itself
            f = Path(os.fsdecode(e.filename))
            where = next((p for p in (f, *f.parents) if p.exists() and not p.is_dir()), f)
    elif isinstance(e, (OSError, RuntimeError)) and any(w in str(e) for w in SHORT_WRITE):
        cause = "no space left on the device: a write cut short"
    else:
        return None
    where = Path(where)
    try:
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
        cause += f", {free / 2**20:.1f} MiB free"
    except (OSError, StopIteration):
        pass
    return DiskError(f"{where}: cannot write ({cause}); fix it and run the same command again: it resumes")


@contextmanager
def disk_errors(where: Path):
    """The block's refusals by the disk as one DiskError line naming `where` (`disk_error`)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        err = disk_error(e, where)
        if err is None or isinstance(e, DiskError):
            raise
        raise err from None

