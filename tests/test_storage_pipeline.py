"""The pipeline with its output root in a bucket of a real S3 server (tests/s3_server.py):
`kdp run --out s3://...` (the in-process executor), reading the rows back with pandas, polars
and duckdb, `kdp report` to and from the bucket, a fresh node resuming from the bucket alone,
and storage errors in one line with nothing written. One reduced tiny run (one student, no
baselines, the classifier threat model, two attacks) is shared by the tests that read it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from conftest import REDUCED, REDUCED_ROWS, same_rows, torch_threads, wait_until
from kdp import cli
from kdp.events import read_events
from kdp.results import load
from kdp.storage import MANIFEST, open_storage
from s3_server import KEY, SECRET

REPO = Path(__file__).resolve().parents[1]
STAGES = ("classifier", "teacher_at", "teacher_nt", "student_kd_at_nt")


def _run_argv(data_dir, out, *extra) -> list[str]:
    return ["run", "--preset", "tiny", "--data-dir", str(data_dir), "--out", str(out), "--quiet", *REDUCED, *extra]


@pytest.fixture(scope="module")
def bucket_run(s3_server, tmp_path_factory, cifar_subset_dir):
    """(URI of the output root, the scratch it ran in, the console) of one reduced tiny run
    into a fresh bucket, run from an empty working directory."""
    bucket, home = "bucketrun", tmp_path_factory.mktemp("bucket_run")
    s3_server.admin().create_dir(bucket)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**s3_server.env, "KDP_SCRATCH": str(home / "scratch")}.items():
            mp.setenv(k, v)
        mp.chdir(home)
        with torch_threads(1):
            rc = cli.main(_run_argv(cifar_subset_dir, f"s3://{bucket}/runs"))
        assert rc == 0
        yield f"s3://{bucket}/runs", home


@pytest.fixture
def env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)


def _objects(s3_server, uri: str) -> dict[str, int]:
    base = uri[len("s3://"):]
    infos = s3_server.admin().get_file_info(pafs.FileSelector(base, recursive=True))
    return {f.path[len(base) + 1:]: f.size for f in infos if f.type == pafs.FileType.File}


def test_a_bucket_output_gives_the_rows_of_a_local_run_and_writes_nothing_local(bucket_run, tiny_run, env):
    uri, home = bucket_run
    rows = load(uri)
    assert len(rows) == REDUCED_ROWS and same_rows(rows, tiny_run)
    assert sorted(p.name for p in home.iterdir()) == ["scratch"]  # no `s3:` directory, nothing else


def test_every_artifact_is_in_the_bucket_and_no_credential_is(bucket_run, s3_server):
    uri, _ = bucket_run
    objects = _objects(s3_server, uri)
    for stage in STAGES:  # a commit, and the files of the version it names
        assert f"tiny/{stage}/{MANIFEST}" in objects, stage
        with s3_server.admin().open_input_stream(f"{uri[5:]}/tiny/{stage}/{MANIFEST}") as f:
            version = json.loads(f.read())["version"]
        assert {f"tiny/{stage}/.kdp-v/{version}/{n}" for n in ("model.pt", "checkpoint.json")} <= set(objects)
    assert {"tiny/config.json", "tiny/results.parquet"} <= set(objects)
    assert any(k.startswith("cache/aes/") and k.endswith(MANIFEST) for k in objects)
    assert any(k.startswith("cache/eval_aes/") and k.endswith(MANIFEST) for k in objects)
    assert any(k.startswith("tiny/events/") and k.endswith(".jsonl") for k in objects)
    assert not any(".tmp-" in k or "preflight" in k for k in objects)
    fs = s3_server.admin()
    for key in objects:
        with fs.open_input_stream(f"{uri[5:]}/{key}") as f:
            data = f.read()
        assert KEY.encode() not in data and SECRET.encode() not in data, key


def test_results_load_from_the_bucket_with_pandas_polars_and_duckdb(bucket_run, env):
    import duckdb
    import polars as pl

    uri, _ = bucket_run
    df = load(uri)
    table = load(uri, as_table=True)
    assert len(pl.from_arrow(table)) == len(df) == REDUCED_ROWS
    rel = duckdb.from_arrow(table)
    assert duckdb.sql("select count(*) from rel where attack = 'pgd8'").fetchall() == [(4,)]
    assert load(f"{uri}/tiny/results.parquet").equals(df)


def test_kdp_report_reads_and_writes_the_bucket(bucket_run, s3_server, env, tmp_path, monkeypatch, capsys):
    uri, _ = bucket_run
    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "scratch"))
    assert cli.main(["report", uri, "--out", f"{uri}/report"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {uri}/report/report.md")
    objects = _objects(s3_server, f"{uri}/report")
    assert "report.md" in objects and any(k.endswith(".png") for k in objects)


def test_a_fresh_node_takes_every_stage_from_the_bucket(bucket_run, env, tmp_path, monkeypatch, capsys,
                                                       cifar_subset_dir):
    uri, _ = bucket_run
    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "scratch"))  # another node: nothing local
    with torch_threads(1):
        assert cli.main(_run_argv(cifar_subset_dir, uri)) == 0
    out = capsys.readouterr().out
    for stage in STAGES:  # named by their place in the bucket, not this node's mirror
        assert f"[{stage}] done already: {uri}/tiny/{stage}\n" in out, stage
    for stage in ("aes", "evaluate"):
        assert f"[{stage}] done already: {uri}/" in out, stage
    assert "started" not in out and "epoch" not in out


def test_a_fresh_node_rescores_with_the_evaluation_aes_in_the_bucket(bucket_run, env, tmp_path, monkeypatch,
                                                                     cifar_subset_dir):
    """--rescore on a node with an empty scratch: the classifier's AEs come from the bucket's
    evaluation AE cache (attack.cached), and the rows are the same, hit by hit."""
    uri, _ = bucket_run
    before = load(uri)
    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "scratch"))
    with torch_threads(1):
        assert cli.main(_run_argv(cifar_subset_dir, uri, "--rescore")) == 0
    after = load(uri)
    crafted = after[~after.attack.isin(("clean", "worst-case"))]
    assert len(crafted) == 8 and crafted["attack.cached"].all()
    cols = ["variant", "attack", "threat_model", "hits"]
    assert after[cols].sort_values(cols).reset_index(drop=True).equals(
        before[cols].sort_values(cols).reset_index(drop=True))


@pytest.mark.slow  # a fault test: a whole stage killed and resumed
def test_a_node_killed_mid_stage_resumes_from_the_bucket_on_another(s3, tmp_path, cifar_subset_dir):
    """SIGKILL (the node dies) after the classifier's 2nd epoch; the same command on a node
    with its own empty scratch resumes the classifier from the state in the bucket."""
    cmd = [sys.executable, "-m", "kdp.cli", *_run_argv(cifar_subset_dir, f"{s3}/runs"),
           "--set", "classifier.epochs=100"]
    firsts = []
    for node in ("a", "b"):
        scratch = tmp_path / node
        events = scratch / s3[5:] / "runs" / "tiny"
        ends = lambda: [e for e in read_events(events) if e["stage"] == "classifier" and e["status"] == "epoch_end"]  # noqa: E731
        log = tmp_path / f"{node}.log"
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "KDP_SCRATCH": str(scratch)},
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: len(ends()) >= 2, 300, f"no classifier epochs on node {node}: {log.read_text()[-2000:]}",
                       interval=0.1)
            firsts.append(ends()[0]["epoch"])
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert firsts[0] == 0 and firsts[1] >= 1, firsts  # node b began where node a's published state ended
    assert "[classifier] resumed" in (tmp_path / "b.log").read_text()


@pytest.mark.slow  # a whole run with the store paused under one of its stages
def test_a_store_paused_mid_stage_is_ridden_out_while_training_goes_on(s3, s3_server, tmp_path, cifar_subset_dir):
    """The store SIGSTOPped once the classifier has ended an epoch: two more epochs end while
    the push of its state waits (the push runs beside training); SIGCONT; the run finishes
    with every row, as if nothing had happened."""
    cmd = [sys.executable, "-m", "kdp.cli", *_run_argv(cifar_subset_dir, f"{s3}/runs"),
           "--set", "classifier.epochs=8"]  # under a second each: room to pause the store after the 1st and see 2 more end
    events = tmp_path / "scratch" / s3[5:] / "runs" / "tiny"
    ends = lambda: [e for e in read_events(events) if e["stage"] == "classifier" and e["status"] == "epoch_end"]  # noqa: E731
    log = tmp_path / "run.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "KDP_STORE_TIMEOUT_S": "2"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: len(ends()) >= 1, 300, f"no classifier epoch: {log.read_text()[-2000:]}", interval=0.05)
        os.killpg(s3_server.proc.pid, signal.SIGSTOP)
        try:
            paused_at = len(ends())
            wait_until(lambda: len(ends()) >= paused_at + 2, 120,
                       f"training waited on the paused store: {log.read_text()[-2000:]}", interval=0.05)
        finally:
            os.killpg(s3_server.proc.pid, signal.SIGCONT)
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = load(f"{s3}/runs/tiny/results.parquet")
    assert set(rows.variant) == {"none", "at_teacher", "nt_teacher", "kd_at_nt"} and (rows.n > 0).all()


@pytest.mark.parametrize("case", ["missing bucket", "wrong credentials", "unreachable endpoint"])
def test_bad_storage_fails_in_one_line_before_any_work(case, s3, s3_server, monkeypatch, tmp_path, capsys,
                                                      cifar_subset_dir):
    uri = {"missing bucket": "s3://nosuchbucket/runs"}.get(case, f"{s3}/runs")
    if case == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    if case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    assert cli.main(_run_argv(cifar_subset_dir, uri)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kdp: error: {uri}: ") and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir()) and _objects(s3_server, s3) == {}  # nothing written, here or there


def test_entry_points_without_bucket_support_refuse_a_uri_in_one_line(env, capsys):
    for argv, what in [(["cache", "s3://kdp/x"], "kdp cache"), (["analyze", "s3://kdp/x"], "kdp analyze")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"kdp: error: s3://kdp/x: {what} takes a local path; bucket URIs are supported by kdp run, "
                       "kdp sweep, kdp report and kdp.results.load (docs/object-storage.md)"), err


@pytest.mark.parametrize("job", ["pipeline.py", "sweep.py"])
def test_the_ray_jobs_refuse_a_missing_bucket_in_one_line_before_ray_starts(s3_server, env, job):
    uri = "s3://nosuchbucket/x"
    proc = subprocess.run([sys.executable, f"jobs/{job}", "--out", uri], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, proc.stderr
    assert err.startswith(f"{job.split('.')[0]}: error: {uri}: no bucket 'nosuchbucket' at http://127.0.0.1:"), err


def _copy_run(s3_server, uri: str, home: Path, bucket: str, maker: Path) -> str:
    """A copy of the shared bucket run into `bucket` (server-side), and of its making node's
    mirror into the scratch `maker`: the same run, for a test to break."""
    admin, src = s3_server.admin(), uri[len("s3://"):]
    admin.create_dir(bucket)
    for f in admin.get_file_info(pafs.FileSelector(src, recursive=True)):
        if f.type == pafs.FileType.File:
            admin.copy_file(f.path, bucket + f.path[len(src.split("/")[0]):])
    shutil.copytree(home / "scratch" / src.split("/")[0], maker / bucket, symlinks=True)
    return f"s3://{bucket}/runs"


def _delete_committed(s3_server, key: str, name: str) -> None:
    """Delete one file of the version the commit at `key` names (a lifecycle rule, an operator)."""
    admin = s3_server.admin()
    with admin.open_input_stream(f"{key}/{MANIFEST}") as f:
        version = json.loads(f.read())["version"]
    admin.delete_file(f"{key}/.kdp-v/{version}/{name}")


def test_a_bucket_that_lost_files_heals_from_the_making_node_and_fresh_nodes_make_them_again(
        bucket_run, s3_server, env, tmp_path, monkeypatch, capsys, cifar_subset_dir):
    uri, home = bucket_run
    healed = _copy_run(s3_server, uri, home, "healrun", tmp_path / "maker")
    base, student = healed[len("s3://"):], "student_kd_at_nt"
    _delete_committed(s3_server, f"{base}/tiny/{student}", "model.pt")
    entries = [f.path for f in s3_server.admin().get_file_info(pafs.FileSelector(f"{base}/cache/eval_aes"))]
    with s3_server.admin().open_output_stream(f"{entries[0]}/{MANIFEST}") as out:
        out.write(b"{not json")  # an evaluation AE entry's commit, corrupt

    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "maker"))  # the node that made the run: its mirror holds all
    with torch_threads(1):
        assert cli.main(_run_argv(cifar_subset_dir, healed)) == 0
    out = capsys.readouterr().out
    assert f"[{student}] done already" in out and "started" not in out, out
    fresh = open_storage(healed, tmp_path / "check")
    assert fresh.pull(fresh.root / "tiny" / student)  # healed by the maker's publish

    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "fresh"))  # a fresh node rescoring: the corrupt entry is crafted again
    before = load(uri)
    with torch_threads(1):
        assert cli.main(_run_argv(cifar_subset_dir, healed, "--rescore")) == 0
    err = capsys.readouterr().err
    assert f"{entries[0].split('/')[-1]}/{MANIFEST}: a corrupt commit; taken as not made" in err, err
    after = load(healed)
    cols = ["variant", "attack", "threat_model", "hits"]
    assert after[cols].sort_values(cols).reset_index(drop=True).equals(
        before[cols].sort_values(cols).reset_index(drop=True))
    crafted = after[~after.attack.isin(("clean", "worst-case"))]
    assert crafted[~crafted["attack.cached"].astype(bool)].attack.nunique() == 1  # that entry's attack, crafted

    _delete_committed(s3_server, f"{base}/tiny/{student}", "model.pt")  # lost again; another fresh node
    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "fresh2"))
    with torch_threads(1):
        assert cli.main(_run_argv(cifar_subset_dir, healed)) == 0
    got = capsys.readouterr()
    assert f"tiny/{student}: the files its commit names are gone; taken as not made" in got.err, got.err
    assert f"[{student}] done already" not in got.out and "[teacher_at] done already" in got.out, got.out
    assert len(load(healed)) == REDUCED_ROWS


def test_a_store_setting_that_is_not_seconds_is_one_line(s3, monkeypatch, capsys, cifar_subset_dir):
    monkeypatch.setenv("KDP_STORE_RETRY_S", "2min")
    assert cli.main(_run_argv(cifar_subset_dir, f"{s3}/u")) == 2
    err = capsys.readouterr().err
    assert err == "kdp: error: KDP_STORE_RETRY_S='2min': not a number of seconds (e.g. KDP_STORE_RETRY_S=120)\n", err


def test_a_bucket_run_publishes_its_curves_as_plain_objects(bucket_run, s3_server):
    uri, _ = bucket_run
    base = f"{uri[len('s3://'):]}/tiny/tensorboard"
    files = [f.path[len(base) + 1:] for f in s3_server.admin().get_file_info(pafs.FileSelector(base, recursive=True))
             if f.type == pafs.FileType.File]
    assert {f.split("/")[0] for f in files} >= {"classifier", "teacher_at", "teacher_nt", "student_kd_at_nt"}, files
    assert all("/events.out.tfevents." in f for f in files)
