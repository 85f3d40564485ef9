"""Where a result came from: code version, library versions, machine and time."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "torchattacks", "ray", "kdp")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """HEAD of the repository kdp runs from, '+dirty' if it has local changes; 'unknown'
    outside a git checkout (e.g. a Ray working_dir copy)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("KDP_GIT_SHA", "unknown")  # set by launchers that ship a copy
    return sha + ("+dirty" if dirty else "")


def device_name(device: str = "auto") -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _accel(rt) -> str:
    """The fast paths in force (kdp.accel), e.g. 'fp32' or 'bf16+channels_last+compile:default'."""
    if rt is None or not hasattr(rt, "compile"):
        return ""
    from kdp.accel import Accel

    return Accel.of(rt).describe()


def provenance(rt=None) -> dict:
    """Flat dict of provenance fields, all strings, stamped now (UTC)."""
    out = {"git_sha": git_sha(), "python": platform.python_version(), "host": platform.node(),
           "device": device_name(getattr(rt, "device", "auto")),
           "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "accel": _accel(rt)}
    for pkg in PACKAGES:
        out[f"{pkg}_version"] = _version(pkg) or ""
    return out
