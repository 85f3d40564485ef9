"""Slurm through `ray symmetric-run` (jobs/slurm.sbatch, docs/slurm.md), run on this one machine
as a one-node allocation. symmetric-run ends by stopping every Ray process it can see, so each
run is in a PID namespace of its own (`unshare --pid --fork --mount-proc`), where the only Ray
processes are its own. And a job told where its cluster is fails in one line
when none answers there (ray.init would retry for minutes)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REDUCED, same_rows, short_temp_dir
from kdp.distributed.config import expect_cluster
from kdp.errors import ConfigError
from kdp.results import load

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "jobs" / "slurm.sbatch"
PIDNS = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]


def _can_pidns() -> bool:
    return shutil.which("unshare") is not None and subprocess.run([*PIDNS, "true"], capture_output=True).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_job_told_where_its_cluster_is_fails_in_one_line_when_none_answers(monkeypatch):
    port = _free_port()
    monkeypatch.setenv("KDP_CLUSTER_WAIT_S", "0.5")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"--address 127.0.0.1:{port}: no Ray cluster answers there"):
        expect_cluster(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10
    with socket.socket() as s:  # something listening: the address is taken as a cluster, and Ray connects
        s.bind(("127.0.0.1", 0))
        s.listen()
        expect_cluster(f"127.0.0.1:{s.getsockname()[1]}")
    expect_cluster("auto")  # Ray's own lookup: not probed


@pytest.mark.slow  # a subprocess, 3 s: CI (make test's time); the check itself is in the test above
def test_the_ray_job_with_an_address_nothing_answers_exits_2_in_one_line(tmp_path, cifar_subset_dir):
    port = _free_port()
    proc = subprocess.run([sys.executable, "jobs/pipeline.py", "--preset", "tiny", "--data-dir", str(cifar_subset_dir),
                           "--out", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"], cwd=REPO,
                          env={**os.environ, "KDP_CLUSTER_WAIT_S": "0.5"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"pipeline: error: --address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused for 0.5 s); "
        "start it first (ray start --head, ray symmetric-run), or leave out --address and RAY_ADDRESS to start a "
        "local Ray"], proc.stderr


def _sbatch(port: int, out: Path, data_dir: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    """jobs/slurm.sbatch outside Slurm (one node, head 127.0.0.1), in a PID namespace of its own."""
    with short_temp_dir() as ray_tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KDP_PRIVATE"))}
        env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", HOME=str(home), RAY_TMPDIR=str(ray_tmp),
                   TMPDIR=str(home), KDP_RAY_PORT=str(port), OMP_NUM_THREADS="1")
        return subprocess.run([*PIDNS, "bash", str(SBATCH), "jobs/pipeline.py", "--preset", "tiny", "--data-dir",
                               str(data_dir), "--out", str(out), "--quiet", *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # a Ray head and the reduced tiny pipeline on it: about 60 s on 2 cores
@pytest.mark.ray
@pytest.mark.skipif(not _can_pidns(), reason="needs user and PID namespaces (unshare --pid --fork --mount-proc)")
def test_symmetric_run_gives_the_rows_of_the_in_process_run(tmp_path, tiny_run, cifar_subset_dir):
    home = tmp_path / "home"
    home.mkdir()
    start = time.monotonic()
    proc = _sbatch(_free_port(), tmp_path / "out", cifar_subset_dir, home, *REDUCED)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Head node started." in proc.stdout, proc.stdout
    assert same_rows(load(tmp_path / "out" / "tiny" / "results.parquet"), tiny_run)
    assert not list(home.glob("kdp-ran-*"))  # the mark was seen and removed
    print(f"symmetric-run of the reduced tiny pipeline: {took:.1f} s")


@pytest.mark.slow  # a Ray head that cannot start: about 10 s
@pytest.mark.ray
@pytest.mark.skipif(not _can_pidns(), reason="needs user and PID namespaces (unshare --pid --fork --mount-proc)")
def test_a_head_that_cannot_start_fails_the_batch_job_though_symmetric_run_exits_0(tmp_path, cifar_subset_dir):
    """A port in Ray's worker range (10002-19999): the head's `ray start` fails, symmetric-run
    exits 0 without running the job; the batch script's mark is missing, so it exits 1."""
    home = tmp_path / "home"
    home.mkdir()
    proc = _sbatch(10005, tmp_path / "out", cifar_subset_dir, home)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Failed to start Ray" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().endswith("slurm.sbatch: the kdp job never ran: ray symmetric-run could not start "
                                        "Ray at 127.0.0.1:10005 (see above)"), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
