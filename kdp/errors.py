"""What kdp reports as bad input. A `KdpError` is named in one line with exit code 2 by `kdp`
and the jobs (`kdp.commands.run_errors`); anything else is a bug or a failure of the machine and
keeps its traceback, on the console and in the run's event log, with exit code 1.

Each type also derives from the builtin a caller would catch (ValueError, FileNotFoundError,
RuntimeError, TimeoutError), so library users keep their except clauses."""
from __future__ import annotations


class KdpError(Exception):
    """Bad input, checked before any work starts wherever it can be."""


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
