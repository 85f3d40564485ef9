"""The Ray job and sweep on a simulated multi-node cluster (tests/cluster_sim.py): a head with
0 CPUs, as in cluster.yaml, and 1-CPU worker nodes on their own loopback addresses. Worker
nodes may carry a GPU resource that no code can use (no CUDA here): the job must then still
train on the CPU with the gloo backend, one GPU per stage and task, as it would on a cluster."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster_sim import autoscaling_cluster, can_unshare, run_job, sim_cluster, start_job
from conftest import in_flight, latest_checkpoint_epoch, new_events, state_epoch, wait_until
from kdp.events import read_events
from kdp.results import load
from kdp.storage import BucketStorage

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.cluster]

# the smoke preset on 1024 training images, 32 test images, one student, two attacks, no baselines
TINY = ["--preset", "smoke", "--set", "students=at+nt", "--set", "data.n_train=1024", "--set", "data.n_test=32", "--set", "classifier.epochs=2",
        "--set", "students.epochs=1", "--set", "eval.attacks=fgsm+pgd8", "--set", "eval.batch_size=32",
        "--set", "baselines=", "--set", "eval.threat_models=classifier+full", "--set", "eval.adaptive_attacks=pgd8",
        "--eval-shard-size", "16"]
N_ROWS = 4 * 3 + 4  # (clean, fgsm, pgd8) x 4 variants (none, AT, NT, KD <- AT+NT) + full-model pgd8 x 4
# the node-loss jobs: no student, the classifier threat model only (what they test is the AT teacher)
LOSS = ["--set", "students=", "--set", "eval.threat_models=classifier"]
LOSS_ROWS = 3 * 3  # (clean, fgsm, pgd8) x (none, AT, NT)


def _train_nodes(events: list[dict], stage: str) -> set[str]:
    return {e["node_ip"] for e in events if e["stage"] == stage and e["status"] == "epoch_end"}


def _span(events: list[dict], stage: str) -> tuple[float, float]:
    t = [e["time"] for e in events if e["stage"] == stage and e["status"] in ("started", "finished")]
    return min(t), max(t)


def test_smoke_job_runs_across_nodes(tmp_path, cifar_subset_dir):
    """GPU stages and tasks on a GPU resource without CUDA (CPU device, gloo), on the worker
    nodes only. Re-run under another name with the first run's classifier and only the
    teachers, scored on clean images and FGSM: its training AEs come from the cache, so both
    teachers start at once, on different nodes (1 GPU each)."""
    out = tmp_path / "out"
    common = [*TINY, "--data-dir", str(cifar_subset_dir), "--out", str(out), "--use-gpu", "--backend", "gloo"]
    with sim_cluster(workers=2, gpus=1) as c:
        first = run_job(c, "pipeline.py", *common, "--name", "smoke")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        again = run_job(c, "pipeline.py", *common, "--name", "again", "--classifier", str(out / "smoke" / "classifier"),
                        "--set", "students=", "--set", "eval.attacks=fgsm", "--set", "eval.threat_models=classifier")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(load(out / "smoke" / "results.parquet")) == N_ROWS
    assert len(load(out / "again" / "results.parquet")) == 2 * 3  # (clean, fgsm) x (none, AT, NT)
    for name in ("smoke", "again"):
        assert {e["node_ip"] for e in read_events(out / name) if "node_ip" in e} <= {"127.0.0.2", "127.0.0.3"}
    events = read_events(out / "again")
    assert ("aes", "skipped") in {(e["stage"], e["status"]) for e in events}
    # a hand-started cluster does not grow: two 1-GPU nodes run two stages at a time, no more
    assert max(in_flight(read_events(out / "smoke"))) == max(in_flight(events)) == 2
    at, nt = _span(events, "teacher_at"), _span(events, "teacher_nt")
    assert at[0] < nt[1] and nt[0] < at[1], f"the teachers did not overlap: AT {at}, NT {nt}"
    at_nodes, nt_nodes = _train_nodes(events, "teacher_at"), _train_nodes(events, "teacher_nt")
    assert len(at_nodes) == 1 and len(nt_nodes) == 1 and at_nodes != nt_nodes, (at_nodes, nt_nodes)


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


def test_a_sweep_into_a_bucket_on_an_autoscaling_cluster_runs_trials_at_once(s3, tmp_path, cifar_subset_dir):
    """Two trials on a cluster that starts with no worker nodes, the output root in a bucket:
    the autoscaler adds nodes, both trials are in flight at some moment, and what both need
    (classifier, training AEs, teachers) is made once, leased through Ray."""
    uri = f"{s3}/out"
    sweep = [*TINY, "--set", "at_teacher.epochs=1", "--set", "nt_teacher.epochs=1", "--name", "grow",
             "--variants", "kd_nt", "--beta", "0.25,0.5", "--set", "eval.threat_models=classifier",
             "--set", "eval.attacks=fgsm"]
    with autoscaling_cluster(max_workers=3) as c:
        proc = run_job(c, "sweep.py", *sweep, "--data-dir", str(cifar_subset_dir), "--out", uri)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reader = BucketStorage(uri, tmp_path / "reader")  # a fresh node: the bucket alone
    reader.pull_tree(reader.root / "grow")
    trials = [e for e in read_events(reader.root / "grow") if e["stage"] == "trial"]
    n, most = 0, 0
    for e in trials:
        n += {"started": 1, "finished": -1}.get(e["status"], 0)
        most = max(most, n)
    assert sum(e["status"] == "finished" for e in trials) == 2
    assert most > 1, f"one trial at a time: {[(e['by'], e['status']) for e in trials]}"
    made = [e["stage"] for e in read_events(reader.root / "grow" / "shared") if e["status"] == "finished"]
    assert sorted(made) == ["aes", "classifier", "teacher_at", "teacher_nt"], made
    df = load(f"{uri}/results")
    # each trial: its one variant against the classifier on clean images and fgsm
    per_trial = {t: sorted(zip(g.threat_model, g.attack)) for t, g in df.groupby("trial_id")}
    expected = [("classifier", "clean"), ("classifier", "fgsm")]
    assert len(per_trial) == 2 and all(rows == expected for rows in per_trial.values()), per_trial
    assert set(df.sweep_id) == {"grow"}


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
            pids = [ray.get(task.remote(os.getpid, None, None), timeout=120) for _ in range(3)]
            cpu_task = RayExecutor(ScaleConfig()).task()
            cpu_pids = [ray.get(cpu_task.remote(os.getpid, None, None), timeout=120) for _ in range(3)]
        finally:
            ray.shutdown()
    assert len(set(pids)) == 3, pids
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
