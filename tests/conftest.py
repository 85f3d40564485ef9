"""Shared fixtures: the real CIFAR-10 subset (read-only, outside the repo) and a tiny slice of it."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdp.data import load_cifar

# 2 cores in CI. KDP_TEST_THREADS lets a developer use 1 thread when the machine is busy
# (two OpenMP pools oversubscribing 2 cores slow torch down by an order of magnitude).
torch.set_num_threads(int(os.environ.get("KDP_TEST_THREADS", "2")))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_SUBSET = SHARED_DATA / "cifar10-subset"
CIFAR_JPEG_ZIP = SHARED_DATA / "cifar10-jpeg.zip"


@pytest.fixture(scope="session")
def cifar_subset_dir() -> Path:
    """The 5085/1017-image CIFAR-10 subset in the python-pickle layout (never copied here)."""
    if not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {CIFAR_SUBSET}")
    return CIFAR_SUBSET


@pytest.fixture(scope="session")
def cifar_jpeg_zip() -> Path:
    """All 60000 CIFAR-10 images as an ImageFolder zip of JPEGs (lossy; never copied here)."""
    if not CIFAR_JPEG_ZIP.is_file():
        pytest.skip(f"CIFAR-10 JPEG zip not found at {CIFAR_JPEG_ZIP}")
    return CIFAR_JPEG_ZIP


@pytest.fixture(scope="session")
def tiny_data(cifar_subset_dir):
    """The first 256 training and 64 test images of the subset (treat as read-only)."""
    return load_cifar(cifar_subset_dir, n_train=256, n_test=64)


def _ray_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server|dashboard|ray/_private"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


@contextlib.contextmanager
def ray_head(gcs_port: int, dashboard_port: int, env_vars: dict, num_cpus: int = 2):
    """A real Ray head (`ray start --head`, dashboard on) bound to 127.0.0.1; yields the env for
    subprocesses. Teardown SIGKILLs whatever `ray stop` leaves behind."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **env_vars, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run([bin_dir / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    subprocess.run([bin_dir / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}",
                    "--include-dashboard=true", "--disable-usage-stats"], env=env, check=True, timeout=180,
                   capture_output=True)
    old = {k: os.environ.get(k) for k in env_vars}
    os.environ.update(env_vars)
    try:
        yield env
    finally:
        subprocess.run([bin_dir / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        for pid in _ray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
