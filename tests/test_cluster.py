"""The Ray job and sweep on a simulated multi-node cluster (tests/cluster_sim.py): a head with
0 CPUs, as in cluster.yaml, and 1-CPU worker nodes on their own loopback addresses. Worker
nodes may carry a GPU resource that no code can use (no CUDA here): the job must then still
train on the CPU with the gloo backend, one GPU per stage and task, as it would on a cluster."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster_sim import autoscaling_cluster, can_unshare, run_job, sim_cluster, start_job
from conftest import in_flight, latest_checkpoint_epoch, new_events, state_epoch, wait_until, wide
from kdp.events import read_events
from kdp.results import load
from kdp.storage import BucketStorage

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.cluster]

# the tiny preset (1024 training images, 32 test images, 8-wide models), one student, two attacks, no baselines
TINY = ["--preset", "tiny", "--set", "students=at+nt", "--set", "classifier.epochs=2", "--set", "eval.attacks=fgsm+pgd8",
        "--set", "baselines=", "--set", "eval.threat_models=classifier+full", "--set", "eval.adaptive_attacks=pgd8"]
# the node-loss jobs: no student, the classifier threat model only (what they test is the AT teacher),
# the evaluation in 16-image shards over the nodes that are left
LOSS = ["--set", "students=", "--set", "eval.threat_models=classifier", *wide("at_teacher"), "--eval-shard-size", "16"]
LOSS_ROWS = 4 * 3  # (clean, fgsm, pgd8, the worst case) x (none, AT, NT)


def _train_nodes(events: list[dict], stage: str) -> set[str]:
    return {e["node_ip"] for e in events if e["stage"] == stage and e["status"] == "epoch_end"}


def _span(events: list[dict], stage: str) -> tuple[float, float]:
    t = [e["time"] for e in events if e["stage"] == stage and e["status"] in ("started", "finished")]
    return min(t), max(t)


def test_smoke_job_runs_across_nodes(tmp_path, cifar_subset_dir):
    """GPU stages and tasks on a GPU resource without CUDA (CPU device, gloo), on the worker
    nodes only, two at a time (a hand-started cluster does not grow): the classifier and the
    NT teacher, which needs no input, start at once on different nodes (1 GPU each)."""
    out = tmp_path / "out"
    with sim_cluster(workers=2, gpus=1) as c:  # no student: each GPU stage and task is a fresh worker, ~5 s
        job = run_job(c, "pipeline.py", *TINY, "--set", "students=", "--set", "eval.threat_models=classifier",
                      "--data-dir", str(cifar_subset_dir), "--out", str(out), "--use-gpu", "--backend", "gloo",
                      "--name", "smoke")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert len(load(out / "smoke" / "results.parquet")) == LOSS_ROWS
    events = read_events(out / "smoke")
    assert {e["node_ip"] for e in events if "node_ip" in e} <= {"127.0.0.2", "127.0.0.3"}
    assert max(in_flight(events)) == 2
    clf, nt = _span(events, "classifier"), _span(events, "teacher_nt")
    assert clf[0] < nt[1] and nt[0] < clf[1], f"the classifier and the NT teacher did not overlap: {clf}, {nt}"
    clf_nodes, nt_nodes = _train_nodes(events, "classifier"), _train_nodes(events, "teacher_nt")
    assert len(clf_nodes) == 1 and len(nt_nodes) == 1 and clf_nodes != nt_nodes, (clf_nodes, nt_nodes)


@pytest.mark.long  # 157 s; node loss of a one-worker task (the default) is in CI: the bucket test below
def test_node_loss_resumes_the_stage_on_another_node(tmp_path, cifar_subset_dir):
    """Kill the node training the AT teacher (every process at once) after its 2nd epoch's
    checkpoint: the stage resumes from it on another node and the job completes. The stages
    are Ray Train runs here (--one-worker train): Train's own failover is what this tests
    (a one-worker task retried after its worker died: tests/test_jobs.py; after its node
    died, with a bucket output: the bucket test below)."""
    out, run = tmp_path / "out", tmp_path / "out" / "loss"
    with sim_cluster(workers=3) as c:
        job = start_job(c, "pipeline.py", *TINY, *LOSS, "--data-dir", str(cifar_subset_dir), "--out", str(out), "--name",
                        "loss", "--one-worker", "train", "--set", "at_teacher.epochs=4", "--set", "nt_teacher.epochs=2", log=tmp_path / "job.log")
        try:
            wait_until(lambda: latest_checkpoint_epoch(out / "ray" / "loss-teacher_at") >= 2, 600, "no 2nd AT checkpoint")
            victim = [e for e in read_events(run) if e["stage"] == "teacher_at" and e["status"] == "epoch_end"][-1]
            c.kill_worker(victim["node_ip"])  # returns once every process of the node is gone
            seen = read_events(run)  # all the dead node will ever have logged
            rc = job.wait(timeout=900)
        finally:
            if job.poll() is None:
                job.kill()
    assert rc == 0, (tmp_path / "job.log").read_text()[-4000:]
    ends = [e for e in read_events(run) if e["stage"] == "teacher_at" and e["status"] == "epoch_end"]
    after = [e for e in new_events(seen, read_events(run)) if e["stage"] == "teacher_at" and e["status"] == "epoch_end"]
    assert after and {e["node_ip"] for e in after} != {victim["node_ip"]}, "did not move to another node"
    assert victim["node_ip"] not in {e["node_ip"] for e in after}
    epochs = [e["epoch"] for e in ends]
    assert sorted(set(epochs)) == [0, 1, 2, 3]
    assert len(epochs) - len(set(epochs)) <= 1, f"more than one epoch repeated: {epochs}"
    meta = json.loads((run / "teacher_at" / "checkpoint.json").read_text())
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3, 4]
    assert len(load(run / "results.parquet")) == LOSS_ROWS


def _objects(fs, base: str) -> dict[str, tuple]:
    """Objects under `base` in the bucket: key -> (size, mtime)."""
    return {f.path: (f.size, f.mtime) for f in fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                                                   allow_not_found=True))
            if f.type == pafs.FileType.File}


def _sweep_events(reader: BucketStorage, sweep: Path) -> list[dict]:
    """The sweep's events (its trials' starts and ends) and its shared artifacts', as the
    bucket holds them now."""
    for d in (sweep, sweep / "shared"):
        reader.pull_tree(d / "events")
    return read_events(sweep) + read_events(sweep / "shared")


def _in_flight_trials(events: list[dict]) -> int:
    """The most trials started and not yet finished at any point of the log."""
    n, most = 0, 0
    for e in events:
        if e["stage"] == "trial":
            n += {"started": 1, "finished": -1}.get(e["status"], 0)
            most = max(most, n)
    return most


def test_a_bucket_sweep_on_an_autoscaling_cluster_runs_trials_at_once_and_resumes_its_killed_driver(
        s3, s3_server, tmp_path, cifar_subset_dir):
    """Two trials, the AT teacher alone and a student distilled from both teachers, on a cluster
    that starts with no worker nodes, the output root in a bucket: the autoscaler adds nodes and
    both trials are in flight at once. Once one trial's results file is in the bucket, the
    driver is SIGKILLed; `--resume` reads the experiment back from the bucket and finishes the
    other trial without redoing the finished one. What both need (classifier, training AEs,
    teachers) was made once, leased through Ray. A fresh mirror then finds it all in the
    bucket: one parquet file per trial with fixed types (pandas, polars, duckdb), Tune's records,
    the student's Train run; and a report."""
    uri, fs = f"{s3}/out", s3_server.admin()
    results = f"{uri[5:]}/results/sweep_id=grow"
    sweep = [*TINY, "--set", "at_teacher.epochs=1", "--set", "nt_teacher.epochs=1", "--set", "students.epochs=3", *wide("students"),
             "--name", "grow", "--variants", "at_teacher,kd_at_nt", "--beta", "0.25",
             "--set", "eval.threat_models=classifier", "--set", "eval.attacks=fgsm"]
    reader = BucketStorage(uri, tmp_path / "reader")  # the test's own view of the bucket
    with autoscaling_cluster(max_workers=3) as c:
        first = start_job(c, "sweep.py", *sweep, "--data-dir", str(cifar_subset_dir), "--out", uri,
                          log=tmp_path / "first.log")

        def a_trial_finished() -> bool:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            return bool(_objects(fs, results))

        try:
            wait_until(a_trial_finished, 600, "no trial finished within 600 s", interval=0.2)
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the driver dies; Ray kills its trials' actors
            first.wait()
        done = _objects(fs, results)
        before = _sweep_events(reader, reader.root / "grow")
        proc = run_job(c, "sweep.py", "--resume", "--name", "grow", "--out", uri, "--quiet")
    assert len(done) == 1, done
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"results: {uri}/results/sweep_id=grow" in proc.stdout
    files = _objects(fs, results)
    assert len(files) == 2 and {k: files[k] for k in done} == done  # the finished trial's file untouched

    after = _sweep_events(reader, reader.root / "grow")
    assert _in_flight_trials(before) == 2, f"one trial at a time: {before}"
    finished = {Path(k).stem.split("-")[1] for k in done}  # trial-<trial_id>-<uuid>.parquet
    resumed = new_events(before, after, new_writers=True)  # not a late line of a first-run process
    assert all(e["status"] == "skipped" for e in resumed if e.get("by") in finished), resumed
    made = [e["stage"] for e in after if e["status"] == "finished" and e["stage"] not in ("trial", "sweep")]
    assert sorted(made) == ["aes", "classifier", "teacher_at", "teacher_nt"], made
    _everything_is_in_the_bucket(uri, tmp_path)


def _everything_is_in_the_bucket(uri: str, tmp_path: Path) -> None:
    """The two-trial sweep "grow" as a fresh mirror of the bucket sees it, and a report of it."""
    import duckdb
    import polars as pl

    from kdp import cli

    df = load(f"{uri}/results")
    assert df.trial_id.nunique() == 2 and set(df.sweep_id) == {"grow"}
    assert sorted(df.groupby("trial_id")["sweep.variant"].first()) == ["at_teacher", "kd_at_nt"]
    assert sorted(zip(df.threat_model, df.attack)) == sorted([("classifier", "clean"), ("classifier", "fgsm"),
                                                              ("classifier", "worst-case")] * 2)
    kd = df[df["sweep.variant"] == "kd_at_nt"]
    assert (kd["purifier.beta"] == kd["sweep.beta"]).all() and set(kd.variant) == {"kd_at_nt"}
    assert set(df[df["sweep.variant"] == "at_teacher"].variant) == {"at_teacher"}
    for col, dtype in {"accuracy": "float64", "n": "int64", "sweep.beta": "float64", "sweep.eps": "float64"}.items():
        assert str(df[col].dtype) == dtype, col
    rows = load(f"{uri}/results", as_table=True)
    assert pl.from_arrow(rows).height == len(df)
    assert duckdb.sql("select count(distinct trial_id) from rows").fetchall() == [(2,)]

    reader = BucketStorage(uri, tmp_path / "fresh")
    reader.pull_tree(reader.root)
    root = reader.root / "grow"
    assert len(list(root.glob("trials/*/student/.kdp-manifest.json"))) == 1  # the AT teacher alone trains none
    assert list(root.glob("ray/*student*/checkpoint_manager_snapshot.json"))  # Train's run
    tune = [json.loads(p.read_text().splitlines()[-1]) for p in root.glob("tune/*/result.json")]
    assert len(tune) == 2 and all("acc/fgsm" in r for r in tune), tune
    assert len(list(root.glob("tune/*/events.out.tfevents*"))) >= 2
    assert cli.main(["report", f"{uri}/results", "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Table 1" in report and "## Table 2 (ablation)" in report and "## Sanity checks" in report


@pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_a_node_that_cannot_see_the_output_root_fails_the_job(tmp_path, cifar_subset_dir):
    """The last worker node has an empty directory mounted over the output root (its shared
    filesystem not mounted): the job fails before any stage, in one line naming it."""
    out = tmp_path / "out"
    out.mkdir()
    with sim_cluster(workers=2, hide=out) as c:
        proc = run_job(c, "pipeline.py", *TINY, "--data-dir", str(cifar_subset_dir), "--out", str(out),
                       "--name", "blind", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "node 127.0.0.3 " in errors[0] and str(out) in errors[0] and "same storage" in errors[0], errors[0]
    assert not (out / "blind").exists(), "a stage ran before the storage check"


def test_gpu_tasks_get_a_fresh_worker_each(tmp_path):
    """A GPU task's worker process exits after it (max_calls=1): no CUDA state is carried into
    the next task. Ray takes max_calls only in ray.remote, not in .options()."""
    import os

    import ray

    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor

    with sim_cluster(workers=1, gpus=1) as c:
        ray.init(address=c.address, log_to_driver=False)
        try:
            task = RayExecutor(ScaleConfig(use_gpu=True)).task()
            pids = [ray.get(task.remote(os.getpid, None, None), timeout=120) for _ in range(2)]
            cpu_task = RayExecutor(ScaleConfig()).task()
            cpu_pids = [ray.get(cpu_task.remote(os.getpid, None, None), timeout=120) for _ in range(3)]
        finally:
            ray.shutdown()
    assert len(set(pids)) == 2, pids
    assert len(set(cpu_pids)) < 3, cpu_pids  # CPU workers are reused: the difference is max_calls


def _bucket_state_epoch(fs, key: str, tmp: Path) -> int:
    """Epochs done in the training state the bucket holds at `key` (0: none yet). The job
    replaces that object every epoch, and a read that opens before a replacement and reads
    after it comes back torn (its size is the old one's): read until the object stood still."""
    for _ in range(5):
        try:
            before = fs.get_file_info(key)
            with fs.open_input_stream(key) as src:
                tmp.write_bytes(src.read())
        except FileNotFoundError:
            return 0
        after = fs.get_file_info(key)
        if (before.size, before.mtime_ns) == (after.size, after.mtime_ns) == (tmp.stat().st_size, after.mtime_ns):
            return state_epoch(tmp)
    return 0  # replaced on every read: look again at the next poll


@pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_a_bucket_job_shares_no_directory_and_resumes_a_lost_node_from_the_bucket(s3, s3_server, tmp_path,
                                                                                 cifar_subset_dir):
    """Every worker node has a scratch directory of its own over the common KDP_SCRATCH path
    (its own mount namespace), so the nodes share no directory and the job's output is a bucket.
    Once the bucket holds the AT teacher's 2nd epoch, the node training it (a Ray task) is
    killed: Ray retries the task on another node, which resumes from the state in the bucket."""
    scratch = Path(os.environ["KDP_SCRATCH"])
    scratch.mkdir(parents=True)
    uri, fs = f"{s3}/out", s3_server.admin()
    state_key = f"{uri[5:]}/loss/state/teacher_at.pt"
    with sim_cluster(workers=3, private=scratch) as c:
        job = start_job(c, "pipeline.py", *TINY, *LOSS, "--data-dir", str(cifar_subset_dir), "--out", uri, "--name", "loss",
                        "--set", "at_teacher.epochs=4", "--set", "nt_teacher.epochs=2", log=tmp_path / "job.log")
        try:
            wait_until(lambda: _bucket_state_epoch(fs, state_key, tmp_path / "state.pt") >= 2, 600,
                       "no 2nd AT epoch in the bucket", interval=0.5)
            holders = [ip for ip, d in c.hidden.items()
                       if (d / s3[5:] / "out" / "loss" / "state" / "teacher_at.pt").is_file()]
            assert len(holders) == 1, holders  # one node trains it, in its own scratch
            c.kill_worker(holders[0])
            rc = job.wait(timeout=900)
        finally:
            if job.poll() is None:
                job.kill()
        worked = [ip for ip, d in c.hidden.items() if any(d.iterdir())]
    assert rc == 0, (tmp_path / "job.log").read_text()[-4000:]
    assert len(worked) >= 2, worked
    reader = BucketStorage(uri, tmp_path / "reader")  # a fresh node: the bucket alone
    assert reader.pull(reader.root / "loss" / "teacher_at")
    meta = json.loads((reader.root / "loss" / "teacher_at" / "checkpoint.json").read_text())
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3, 4]
    (tmp_path / "events" / "events").mkdir(parents=True)  # the run's event log: every writer's object
    pafs.copy_files(f"{uri[5:]}/loss/events", str(tmp_path / "events" / "events"), source_filesystem=fs)
    ends = [e for e in read_events(tmp_path / "events") if e["stage"] == "teacher_at" and e["status"] == "epoch_end"]
    assert ends and holders[0] not in {e["node_ip"] for e in ends}  # the lost node never published its events
    assert min(e["epoch"] for e in ends) >= 2 and max(e["epoch"] for e in ends) == 3, [e["epoch"] for e in ends]
    assert len(load(f"{uri}/loss/results.parquet")) == LOSS_ROWS
