"""jobs/sweep.py on a real local Ray head (2 CPUs): a sweep whose driver is SIGKILLed part-way
and then resumed (a sweep's sharing, files and Tune records: tests/test_e2e_ray.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_ports, new_events, ray_head, wait_until
from kdp.events import read_events
from kdp.results import load

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
def head(ports):
    with ray_head(*ports, ENV) as env:
        yield env


def _cmd(ports: list[int], out: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "sweep.py"), "--address", f"127.0.0.1:{ports[0]}",
            "--out", str(out), *args]


def _events(path: Path) -> list[dict]:
    return read_events(path)


def _made(sweep_dir: Path) -> dict[str, int]:
    """How many times each shared stage was made (finished), from the sweep's own log."""
    counts: dict[str, int] = {}
    for e in _events(sweep_dir / "shared"):
        if e["status"] == "finished":
            counts[e["stage"]] = counts.get(e["stage"], 0) + 1
    return counts


def test_killed_sweep_resumes_without_rerunning_finished_trials(head, ports, tmp_path, cifar_subset_dir):
    args = [*TINY, "--data-dir", str(cifar_subset_dir), "--name", "kill", "--variants", "at_only,kd_nt",
            "--eps", "4/255,8/255", "--max-concurrent", "1"]
    results = tmp_path / "results" / "sweep_id=kill"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cmd(ports, tmp_path, *args), env=head, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)

    def a_trial_finished() -> bool:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        return bool(list(results.glob("*.parquet")))

    wait_until(a_trial_finished, 600, "no trial finished within 600 s", interval=0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies; Ray kills its trials' actors
    first.wait()
    done = {p: p.stat().st_mtime_ns for p in results.glob("*.parquet")}
    assert 1 <= len(done) < 4
    sweep_dir = tmp_path / "kill"
    before = _events(sweep_dir / "shared") + _events(sweep_dir)  # the first run's log, as the resume finds it

    proc = subprocess.run(_cmd(ports, tmp_path, "--resume", "--name", "kill", "--quiet"), env=head,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = list(results.glob("*.parquet"))
    assert len(files) == 4 and {p: p.stat().st_mtime_ns for p in done} == done
    df = load(tmp_path / "results")
    assert len(df) == 4 * ATTACKS and df.trial_id.nunique() == 4
    finished = {p.stem.split("-")[1] for p in done}  # trial-<trial_id>-<uuid>.parquet
    assert len(finished) == len(done) and finished <= set(df.trial_id)
    # what the resumed run's processes logged (not a late line of a first-run trial Ray had yet to kill)
    resumed = new_events(before, _events(sweep_dir / "shared") + _events(sweep_dir), new_writers=True)
    assert {e["by"] for e in resumed if e["stage"] == "trial" and e["status"] in ("started", "skipped")} >= (
        set(df.trial_id) - finished), f"the resumed run did not take up the other trials: {resumed}"
    later = [e for e in resumed if e.get("by") in finished]
    assert all(e["status"] == "skipped" for e in later), f"finished trials did work again: {later}"
    made = _made(sweep_dir)
    assert made["classifier"] == 1 and made["teacher_nt"] == 1
    assert len(list((sweep_dir / "shared").glob("teacher_at-*/model.pt"))) == 2  # one per eps
