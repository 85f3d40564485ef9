"""The tiny preset through the Ray entry points, each on the embedded local Ray it starts:
jobs/pipeline.py gives the same rows as the in-process run (`tiny_run`), and jobs/sweep.py
runs a 2-trial Tune sweep whose results `load` reads with pandas, polars and duckdb and
`kdp report` turns into a report. Each job runs as its own process group, ended if it hangs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import short_temp_dir
from kdp import cli
from kdp.results import load

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
KEY = ["variant", "attack", "threat_model"]


def run_job(script: str, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """`python jobs/<script> args` in a session of its own; on timeout its whole process group
    (the driver and the local Ray it started) is killed, so nothing is left behind."""
    with short_temp_dir() as ray_tmp:  # the local Ray's session files go here, removed after
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / script), *args], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{script} still running after {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_ray_job_gives_the_same_rows_as_one_process(tiny_run, tmp_path, cifar_subset_dir):
    """Every stage as a Ray Train run or task (1 CPU, one thread each), the evaluation sharded
    over tasks: the same rows, image by image, as the in-process run of the same config."""
    proc = run_job("pipeline.py", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", str(tmp_path),
                   "--quiet", "--eval-shard-size", "16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ray_rows = load(tmp_path / "tiny" / "results.parquet").sort_values(KEY).reset_index(drop=True)
    local_rows = load(tiny_run / "results.parquet").sort_values(KEY).reset_index(drop=True)
    assert ray_rows[KEY].equals(local_rows[KEY])
    assert ray_rows[["n", "first"]].equals(local_rows[["n", "first"]])
    assert ray_rows["hits"].tolist() == local_rows["hits"].tolist()
    assert f"results: {tmp_path / 'tiny' / 'results.parquet'}" in proc.stdout.splitlines()


def test_a_two_trial_sweep_loads_everywhere_and_reports(tmp_path, cifar_subset_dir):
    proc = run_job("sweep.py", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", str(tmp_path),
                   "--name", "two", "--variants", "kd_at_nt", "--beta", "0.25,0.5", "--quiet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    df = load(results)
    assert df.trial_id.nunique() == 2 and set(df.sweep_id) == {"two"}
    assert sorted(df.groupby("trial_id")["sweep.beta"].first()) == [0.25, 0.5]
    assert (df["purifier.beta"] == df["sweep.beta"]).all() and set(df.variant) == {"kd_at_nt"}

    import duckdb
    import polars as pl

    rows = load(results, as_table=True)
    assert pl.from_arrow(rows).height == len(df)
    assert duckdb.sql("select count(distinct trial_id) from rows").fetchall() == [(2,)]
    assert cli.main(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Table 1" in report and "## Table 2 (ablation)" in report and "## Sanity checks" in report
