"""A local Ray no other machine can reach: a private network namespace.

Ray 2.60's core servers (the GCS, every raylet and worker) bind gRPC to every interface (in
C++; neither `--node-ip-address` nor any setting changes it, and `127.0.0.1` is rewritten to
the machine's routable address), so a local `ray.init()` listens beyond this machine behind
its token authentication alone. A command that starts its own Ray and needs no network (its
output, data and classifier on local disk) is therefore re-run, before Ray starts, in a user
and network namespace of its own (`unshare --user --map-root-user --net`, no privileges
needed where the kernel allows unprivileged namespaces): its only interface is loopback, so
every port Ray opens is reachable from this machine's processes in it alone. Joining a
cluster (`--address`, RAY_ADDRESS, `ray job submit`) is unchanged.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys

from kdp.errors import ConfigError

NETWORKS = ("auto", "private", "host")
MARK = "KDP_PRIVATE_NETWORK"  # set in the re-run: it is inside the namespace
DOWNLOAD = "a CIFAR-10 download (no --data-dir)"
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net"]


def inside() -> bool:
    """Is this process the re-run inside a private network namespace?"""
    return os.environ.get(MARK) == "1"


def available() -> bool:
    """Does this kernel let this user make a network namespace (Ubuntu 24.04's AppArmor, a
    container's seccomp and some sysctls forbid it)?"""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*_UNSHARE, "true"], capture_output=True).returncode == 0


def wanted(mode: str, paths: list, use_gpu: bool) -> bool:
    """Should a local Ray run in a private network namespace? `paths`: the command's inputs and
    outputs (None: not given); a URI needs the network."""
    if mode not in NETWORKS:
        raise ConfigError(f"--network {mode!r}: expected one of {', '.join(NETWORKS)}")
    if mode == "host" or inside():
        return inside()
    remote = [str(p) for p in paths if p is DOWNLOAD or (p is not None and "://" in str(p))]
    if mode == "private":
        if remote:
            raise ConfigError(f"--network private: {remote[0]} needs the network; pass --network host")
        if not available():
            raise ConfigError("--network private: this system does not allow unprivileged network namespaces "
                              "(unshare --user --net); pass --network host")
        return True
    # multi-GPU NCCL inside the namespace is unverified: a GPU run keeps the host's network
    return not remote and not use_gpu and available()


def network_uses(out, data_dir, classifier=None) -> list:
    """What of a run may need the network: its output, its data (None: a CIFAR-10 download),
    its classifier."""
    return [out, data_dir if data_dir is not None else DOWNLOAD, classifier]


def this_command(argv) -> list[str] | None:
    """The command line to re-run: this process's own when `argv` is None (a command), else
    None (main(argv) called from Python is never re-executed)."""
    return list(sys.orig_argv) if argv is None else None


def rerun_inside(command: list[str]) -> None:
    """Replace this process (same pid: Ctrl-C and a job's signals still reach it) with
    `command` in a new user and network namespace; returns only if this is already that."""
    if inside():
        loopback_up()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[MARK] = "1"
    os.execvp(_UNSHARE[0], [*_UNSHARE, "--", *command])


def loopback_up() -> None:
    """Bring `lo` up (a new namespace's is down): SIOCSIFFLAGS |= IFF_UP, as `ip link set lo up`."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, req))[1]
        if not flags & iff_up:
            fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))
