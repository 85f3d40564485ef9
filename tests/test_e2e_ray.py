"""The tiny preset through the Ray entry points, each on the embedded local Ray it starts:
jobs/pipeline.py gives the same rows as the in-process run (`tiny_run`), and jobs/sweep.py
runs a 2-trial Tune sweep into a bucket (a real S3 server) that shares its inputs, whose
results `load` reads with pandas, polars and duckdb and `kdp report` turns into a report. Each job runs as its own process group, ended if it hangs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import driver_stages, in_flight, short_temp_dir
from kdp import cli
from kdp.events import read_events
from kdp.results import load
from kdp.storage import BucketStorage

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
    over tasks: the same rows, image by image, as the in-process run of the same config.
    Independent stages run at the same time, never more than the 2 CPUs hold; the console has
    one line per stage event and epoch, and each stage's own output is in its log."""
    proc = run_job("pipeline.py", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", str(tmp_path),
                   "--eval-shard-size", "16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ray_rows = load(tmp_path / "tiny" / "results.parquet").sort_values(KEY).reset_index(drop=True)
    local_rows = load(tiny_run / "results.parquet").sort_values(KEY).reset_index(drop=True)
    assert ray_rows[KEY].equals(local_rows[KEY])
    assert ray_rows[["n", "first"]].equals(local_rows[["n", "first"]])
    assert ray_rows["hits"].tolist() == local_rows["hits"].tolist()

    events = read_events(tmp_path / "tiny")
    assert max(in_flight(events)) == 2, in_flight(events)  # 2 CPUs: two 1-CPU stages at once, no more
    first = [e["stage"] for e in events if e["status"] == "started" and e["stage"] not in driver_stages()][:2]
    assert set(first) == {"classifier", "teacher_nt"}, first  # NT needs no input: it starts at once
    console = proc.stdout.splitlines()
    assert f"results: {tmp_path / 'tiny' / 'results.parquet'}" in console
    ours = [line for line in console if line.startswith("[")]
    assert not any(a == b for a, b in zip(ours, ours[1:])), "a console line printed twice in a row"
    assert sum(line.startswith("[teacher_at] epoch 1/2 ") for line in ours) == 1
    assert not any("Reporting training result" in line or "core_worker.cc" in line for line in console)
    assert len(console) < 150, f"{len(console)} console lines"
    assert (tmp_path / "tiny" / "logs" / "teacher_at.log").stat().st_size > 0


@pytest.mark.slow  # Tune end to end; the sweep's own logic is in test_sweep.py (make test)
def test_a_two_trial_sweep_into_a_bucket_shares_its_inputs_loads_everywhere_and_reports(s3, tmp_path,
                                                                                       cifar_subset_dir):
    """Two Tune trials (the AT teacher alone, and a student distilled from both teachers) with
    the output root in a bucket of a real S3 server: the classifier, training AEs and teachers
    are made once and shared (leased through Ray); the student is a Ray Train run whose run
    lives in the bucket; one parquet file per trial, with fixed types, read from the bucket by
    pandas, polars and duckdb; Tune's own records there too; a report. Everything is read back
    through a fresh mirror: the bucket holds it all. (Local sweeps: test_sweep_ray, test_cluster.)"""
    out = f"{s3}/runs"
    proc = run_job("sweep.py", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", out,
                   "--name", "two", "--variants", "at_only,kd_at_nt", "--beta", "0.25", "--quiet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"results: {out}/results/sweep_id=two" in proc.stdout and not (REPO / "s3:").exists()
    df = load(f"{out}/results")
    assert df.trial_id.nunique() == 2 and set(df.sweep_id) == {"two"}
    assert sorted(df.groupby("trial_id")["sweep.variant"].first()) == ["at_only", "kd_at_nt"]
    kd = df[df["sweep.variant"] == "kd_at_nt"]
    assert (kd["purifier.beta"] == kd["sweep.beta"]).all() and set(kd.variant) == {"kd_at_nt"}
    assert set(df[df["sweep.variant"] == "at_only"].variant) == {"at_teacher"}
    for col, dtype in {"accuracy": "float64", "n": "int64", "sweep.beta": "float64", "sweep.eps": "float64"}.items():
        assert str(df[col].dtype) == dtype, col

    reader = BucketStorage(out, tmp_path / "reader")  # a fresh mirror: what the bucket holds
    reader.pull_tree(reader.root)
    root = reader.root
    assert len(list((root / "results" / "sweep_id=two").glob("*.parquet"))) == 2
    made = {}
    for e in read_events(root / "two" / "shared"):
        made[e["stage"]] = made.get(e["stage"], 0) + (e["status"] == "finished")
    assert made == {"classifier": 1, "aes": 1, "teacher_nt": 1, "teacher_at": 1}
    assert len(list((root / "two" / "trials").glob("*/student/.kdp-manifest.json"))) == 1  # at_only trains none
    assert list((root / "two" / "ray").glob("*student*/checkpoint_manager_snapshot.json"))  # Train's run
    tune = [json.loads(p.read_text().splitlines()[-1]) for p in (root / "two" / "tune").glob("*/result.json")]
    assert len(tune) == 2 and all("acc/pgd8" in r for r in tune)
    assert len(list((root / "two" / "tune").glob("*/events.out.tfevents*"))) == 2

    import duckdb
    import polars as pl

    rows = load(f"{out}/results", as_table=True)
    assert pl.from_arrow(rows).height == len(df)
    assert duckdb.sql("select count(distinct trial_id) from rows").fetchall() == [(2,)]
    assert cli.main(["report", f"{out}/results", "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Table 1" in report and "## Table 2 (ablation)" in report and "## Sanity checks" in report
