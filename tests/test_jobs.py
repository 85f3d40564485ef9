"""jobs/pipeline.py on a real local Ray head: the Python JobSubmissionClient and a worker killed
mid-epoch; `ray job stop`, then `ray job submit` of the same run name.

The head is started with `ray start --head` bound to 127.0.0.1 on free ports, with 2 CPUs,
and stopped in teardown by signalling only the processes that fixture started."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_ports, new_events, ray_head, state_epoch, wait_until, wide
from kdp.events import read_events
from kdp.presets import get_preset
from kdp.results import load

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
EXCLUDES = [".venv", ".git", ".gpu", "runs", "docs/runs", "**/__pycache__"]
# a small run: the tiny preset (1024 training images, 8-wide models), one student, two attacks, and an
# AT teacher of smoke size (16-wide, 4+4 blocks) whose epochs of seconds leave time to stop it mid-stage
TINY = ["--set", "students=at+nt", "--set", "classifier.epochs=2", "--set", "eval.attacks=fgsm+pgd8",
        "--set", "baselines=", "--set", "eval.threat_models=classifier+full", "--set", "eval.adaptive_attacks=pgd8",
        *wide("at_teacher"),
        "--eval-shard-size", "16", "--quiet"]
VARIANTS = 4  # none, the two teachers, KD <- AT+NT

@pytest.fixture(scope="module")
def ports() -> list[int]:
    """The head's GCS and dashboard ports (each with the next port up free as well)."""
    return free_ports(2)


@pytest.fixture(scope="module")
def address(ports) -> str:
    return f"http://127.0.0.1:{ports[1]}"


@pytest.fixture(scope="module")
def head(ports):
    with ray_head(*ports, ENV) as env:
        yield env


@pytest.fixture(scope="module")
def client(head, address):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _entrypoint(out: Path, name: str, *extra: str, data: Path, preset: str = "tiny") -> str:
    args = [sys.executable, "jobs/pipeline.py", "--preset", preset, "--data-dir", str(data),
            "--out", str(out), "--name", name, *extra]
    return " ".join(args)


def _runtime_env() -> dict:
    return {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": dict(ENV)}


def _logs(client, job_id: str, tmp_path: Path) -> str:
    """The job's log tail, also saved in the test's tmp_path (<job_id>.log) for post-mortems."""
    text = client.get_job_logs(job_id)
    (tmp_path / f"{job_id}.log").write_text(text)
    return text[-8000:]


def _wait(client, job_id: str, timeout: float = 600) -> str:
    """The job's final status (SUCCEEDED, FAILED or STOPPED), once it has one."""
    from ray.job_submission import JobStatus

    final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    wait_until(lambda: client.get_job_status(job_id) in final, timeout,
               f"job {job_id} not finished after {timeout:.0f} s", interval=1)
    return client.get_job_status(job_id).value


def _events(run_dir: Path) -> list[dict]:
    return read_events(run_dir)


def _wait_for(run_dir: Path, pred, timeout: float = 300) -> dict:
    """The first event of the run's log matching pred, once there is one."""
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [e for e in _events(run_dir) if pred(e)][:1]
        return bool(found)

    wait_until(seen, timeout, f"no matching event under {run_dir / 'events'}", interval=0.1)
    return found[0]


def test_worker_killed_mid_epoch_resumes_from_its_checkpoint(client, tmp_path, cifar_subset_dir):
    """SIGKILL the AT teacher's worker (a one-worker stage: a Ray task) in its 2nd epoch; Ray
    retries the task, which resumes from epoch 1's state file. (A Train run's worker group
    restarting from its checkpoint: tests/test_cluster.py's node loss.)"""
    run = tmp_path / "fault"
    job = client.submit_job(entrypoint=_entrypoint(tmp_path, "fault", *TINY, "--set", "at_teacher.epochs=4",
                                                   "--set", "nt_teacher.epochs=2", data=cifar_subset_dir),
                            runtime_env=_runtime_env(), submission_id="kdp-fault")
    victim = _wait_for(run, lambda e: e["stage"] == "teacher_at" and e["status"] == "epoch_start"
                       and e["epoch"] == 1)
    wait_until(lambda: state_epoch(run / "state" / "teacher_at.pt") >= 1)
    os.kill(victim["pid"], signal.SIGKILL)  # in epoch 1, once epoch 0's state is saved
    assert _wait(client, job) == "SUCCEEDED", _logs(client, job, tmp_path)
    events = _events(run)
    assert victim in events
    # the epochs started after the victim's, in the log's own order, by another worker
    after = [e for e in events[events.index(victim) + 1:] if e["stage"] == "teacher_at"
             and e["status"] == "epoch_start" and e["pid"] != victim["pid"]]
    assert after, "no worker restarted after the kill"
    assert after[0]["epoch"] >= victim["epoch"], "resumed before the last checkpoint"
    assert after[0]["epoch"] <= victim["epoch"] + 1 and after[0]["epoch"] > 0, "did not resume from a checkpoint"
    meta = json.loads((run / "teacher_at" / "checkpoint.json").read_text())
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3, 4]
    df = load(run / "results.parquet")
    # (clean, fgsm, pgd8, worst case) x the variants + (pgd8, the ε curve's unbounded point, worst case) under full
    assert len(df) == VARIANTS * 4 + VARIANTS * 3


def test_a_stopped_job_resubmitted_with_ray_job_submit_skips_finished_stages(head, client, address, tmp_path,
                                                                             cifar_subset_dir):
    """Stop the driver (`ray job stop`: SIGTERM) while the teachers train, re-submit the same
    run name with `ray job submit` and a working dir: the classifier and the AEs are reused,
    and the job writes every row. (The same job's scheduling, rows and console on an embedded
    Ray: tests/test_e2e_ray.py.)"""
    run = tmp_path / "resub"
    entry = _entrypoint(tmp_path, "resub", *TINY, "--set", "at_teacher.epochs=3", "--set", "nt_teacher.epochs=3",
                        data=cifar_subset_dir)
    first = client.submit_job(entrypoint=entry, runtime_env=_runtime_env(), submission_id="kdp-resub-1")
    _wait_for(run, lambda e: e["stage"] == "teacher_at" and e["status"] == "epoch_end")
    t0 = time.monotonic()
    client.stop_job(first)  # SIGTERM to the driver (Ray's SIGKILL follows a few seconds later)
    assert _wait(client, first) == "STOPPED"
    seconds = time.monotonic() - t0
    assert seconds < 15, f"ray job stop took {seconds:.1f} s"
    # kdp's SIGTERM handler, not Ray's SIGKILL, ended it: the stage in flight logged its stop
    assert any(e["status"] == "interrupted" for e in _events(run)), [e["status"] for e in _events(run)][-10:]
    print(f"ray job stop -> STOPPED in {seconds:.1f} s")
    clf_mtime = (run / "classifier" / "model.pt").stat().st_mtime_ns
    aes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "aes").glob("*/x_adv.npy")}
    before = _events(run)
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "kdp-resub-2",
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES, "env_vars": ENV}),
           "--", *entry.split()]
    proc = subprocess.run(cmd, env=head, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert client.get_job_status("kdp-resub-2").value == "SUCCEEDED"
    assert f"results: {run / 'results.parquet'}" in proc.stdout.splitlines()
    assert (run / "classifier" / "model.pt").stat().st_mtime_ns == clf_mtime
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "aes").glob("*/x_adv.npy")} == aes
    later = new_events(before, _events(run))  # what the log got after the first job stopped
    status = {(e["stage"], e["status"]) for e in later}
    assert ("classifier", "skipped") in status
    assert not any(e["stage"] == "classifier" and e["status"] == "epoch_start" for e in later)
    df = load(run / "results.parquet")
    # (clean, fgsm, pgd8, worst case) and (pgd8, the ε curve's unbounded point, worst case) per variant
    assert df.groupby("threat_model").size().to_dict() == {"classifier": VARIANTS * 4, "full": VARIANTS * 3}
    curve = df.attack == "pgd20-eps255"  # on the first eval.indicator_subset images
    assert (df.hits.str.len() == df.n).all() and (df[~curve].n == 32).all()  # shards' hits joined in order
    assert (df[curve].n == get_preset("tiny").eval.indicator_subset).all()
    assert (run / "logs" / "teacher_at.log").stat().st_size > 0
