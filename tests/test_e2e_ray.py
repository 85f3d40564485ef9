"""The tiny preset on the Ray executor, on the embedded local Ray it starts: `kdp run
--executor ray` (the Ray job jobs/pipeline.py is the same command: tests/test_jobs.py submits
it) gives the same rows as the in-process run (`tiny_run`). The command runs as its own process
group, ended if it hangs. (A Tune sweep end to end, into a bucket: tests/test_cluster.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REDUCED, REDUCED_ROWS, driver_stages, in_flight, same_rows, short_temp_dir
from kdp.events import read_events
from kdp.results import load

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


def run_on_ray(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """`kdp run --executor ray args` in a session of its own; on timeout its whole process group
    (the driver and the local Ray it started) is killed, so nothing is left behind."""
    with short_temp_dir() as ray_tmp:  # the local Ray's session files go here, removed after
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, "-m", "kdp", "run", "--executor", "ray", *args], cwd=REPO, env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"kdp run still running after {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_ray_job_gives_the_same_rows_as_one_process(tiny_run, tmp_path, cifar_subset_dir):
    """Every stage as a Ray task (1 CPU, one thread each), the evaluation sharded over tasks:
    the same rows, image by image, as the in-process run (the tiny run reduced to a student,
    two attacks, no baselines: the variants and attacks it has are the tiny run's own).
    Independent stages run at the same time, never more than the 2 CPUs hold; the console has
    one line per stage event and epoch, and each stage's own output is in its log."""
    proc = run_on_ray("--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", str(tmp_path),
                      "--eval-shard-size", "16", *REDUCED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = load(tmp_path / "tiny" / "results.parquet")
    assert len(rows) == REDUCED_ROWS and same_rows(rows, tiny_run)

    events = read_events(tmp_path / "tiny")
    assert max(in_flight(events)) == 2, in_flight(events)  # 2 CPUs: two 1-CPU stages at once, no more
    first = [e["stage"] for e in events if e["status"] == "started" and e["stage"] not in driver_stages()][:2]
    assert set(first) == {"classifier", "teacher_nt"}, first  # NT needs no input: it starts at once
    console = proc.stdout.splitlines()
    assert f"results: {tmp_path / 'tiny' / 'results.parquet'}" in console
    ours = [line for line in console if line.startswith("[")]
    assert not any(a == b for a, b in zip(ours, ours[1:])), "a console line printed twice in a row"
    assert sum(line.startswith("[teacher_at] epoch 1/2 ") for line in ours) == 1
    ended = [line for line in ours if line.startswith("[eval] 100% ")]  # progress (kdp.stages.progress)
    assert len(ended) == 1 and ended[0].startswith("[eval] 100% (3/3 shards, 3/3 attacks) in "), ended
    shard_log = (tmp_path / "tiny" / "logs" / "evaluate.log").read_text()  # each task's own last line
    assert shard_log.count("[eval] 100% in ") == 3
    assert not any("Reporting training result" in line or "core_worker.cc" in line for line in console)
    assert len(console) < 150, f"{len(console)} console lines"
    assert (tmp_path / "tiny" / "logs" / "teacher_at.log").stat().st_size > 0
