"""What kdp reports as bad input. A `KdpError` is named in one line with exit code 2 by `kdp`
and the jobs (`kdp.commands.run_errors`); anything else is a bug or a failure of the machine and
keeps its traceback, on the console and in the run's event log, with exit code 1.

Each type also derives from the builtin a caller would catch (ValueError, FileNotFoundError,
RuntimeError, TimeoutError), so library users keep their except clauses."""
from __future__ import annotations

import re

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


class StorageError(KdpError, RuntimeError):
    """Storage the job writes to that a node cannot see, or that another process holds too long."""
