"""jobs/sweep.py on a real local Ray head (2 CPUs) with its output root in a bucket of a real
S3 server: a sweep whose driver is SIGKILLed part-way and then resumed from the bucket alone
(Tune's experiment, finished trials' results and the shared artifacts are read back from it).
A sweep's sharing, files and Tune records: tests/test_e2e_ray.py; a local sweep's resume:
tests/test_interrupt.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from conftest import free_ports, new_events, ray_head, wait_until
from kdp.events import read_events
from kdp.results import load
from kdp.storage import BucketStorage

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# the tiny preset with two attacks under the classifier threat model
TINY = ["--preset", "tiny", "--set", "eval.attacks=fgsm+pgd8", "--set", "eval.adaptive_attacks=",
        "--set", "eval.threat_models=classifier", "--quiet"]
ATTACKS = 3  # clean, fgsm, pgd8


@pytest.fixture(scope="module")
def ports() -> list[int]:
    """The head's GCS and dashboard ports (each with the next port up free as well)."""
    return free_ports(2)


@pytest.fixture(scope="module")
def head(ports, s3_server, tmp_path_factory):
    """The head, its workers with the S3 server's endpoint and credentials (as a node has its
    own) and a node-local scratch of their own."""
    scratch = tmp_path_factory.mktemp("head_scratch")
    with ray_head(*ports, {**ENV, **s3_server.env, "KDP_SCRATCH": str(scratch)}) as env:
        yield env


def _cmd(ports: list[int], out: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "sweep.py"), "--address", f"127.0.0.1:{ports[0]}",
            "--out", str(out), *args]


def _events(reader: BucketStorage, path: Path) -> list[dict]:
    """The events under `path` as the bucket holds them now."""
    reader.pull_tree(path / "events")
    return read_events(path)


def _objects(reader: BucketStorage, path: Path) -> dict[str, tuple]:
    """Objects under `path` in the bucket: key below the root -> (size, mtime)."""
    base = reader.key(path)
    return {f.path[len(reader.base) + 1:]: (f.size, f.mtime) for f in reader.fs.get_file_info(
        pafs.FileSelector(base, recursive=True, allow_not_found=True)) if f.type == pafs.FileType.File}


def _made(reader: BucketStorage, sweep_dir: Path) -> dict[str, int]:
    """How many times each shared stage was made (finished), from the sweep's own log."""
    counts: dict[str, int] = {}
    for e in _events(reader, sweep_dir / "shared"):
        if e["status"] == "finished":
            counts[e["stage"]] = counts.get(e["stage"], 0) + 1
    return counts


def test_killed_sweep_resumes_from_the_bucket_without_rerunning_finished_trials(head, ports, s3_server, tmp_path,
                                                                                cifar_subset_dir):
    s3_server.admin().create_dir("killsweep")
    out = "s3://killsweep/runs"
    reader = BucketStorage(out, tmp_path / "reader")  # the test's own view of the bucket
    args = [*TINY, "--data-dir", str(cifar_subset_dir), "--name", "kill", "--variants", "at_only,kd_nt",
            "--max-concurrent", "1"]
    results = reader.root / "results" / "sweep_id=kill"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cmd(ports, out, *args), env=head, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)

    def a_trial_finished() -> bool:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        return bool(_objects(reader, results))

    wait_until(a_trial_finished, 600, "no trial finished within 600 s", interval=0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies; Ray kills its trials' actors
    first.wait()
    done = _objects(reader, results)
    assert len(done) == 1
    sweep_dir = reader.root / "kill"
    before = _events(reader, sweep_dir / "shared") + _events(reader, sweep_dir)  # the first run's log

    proc = subprocess.run(_cmd(ports, out, "--resume", "--name", "kill", "--quiet"), env=head,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = _objects(reader, results)
    assert len(files) == 2 and {k: files[k] for k in done} == done  # the finished trial's file untouched
    df = load(f"{out}/results")
    assert len(df) == 2 * ATTACKS and df.trial_id.nunique() == 2
    finished = {Path(k).stem.split("-")[1] for k in done}  # trial-<trial_id>-<uuid>.parquet
    assert len(finished) == len(done) and finished <= set(df.trial_id)
    # what the resumed run's processes logged (not a late line of a first-run trial Ray had yet to kill)
    resumed = new_events(before, _events(reader, sweep_dir / "shared") + _events(reader, sweep_dir),
                         new_writers=True)
    assert {e["by"] for e in resumed if e["stage"] == "trial" and e["status"] in ("started", "skipped")} >= (
        set(df.trial_id) - finished), f"the resumed run did not take up the other trials: {resumed}"
    later = [e for e in resumed if e.get("by") in finished]
    assert all(e["status"] == "skipped" for e in later), f"finished trials did work again: {later}"
    assert _made(reader, sweep_dir) == {"classifier": 1, "aes": 1, "teacher_at": 1, "teacher_nt": 1}
