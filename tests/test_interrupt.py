"""Ctrl-C and SIGTERM stop `kdp run` and the sweeps (jobs/sweep.py, `kdp sweep`, on the local
Ray they start) within seconds, mid-stage, with exit codes 130 / 143 and one line on how to
resume; the same command then resumes the interrupted stage from its last epoch. (The Ray job
jobs/pipeline.py stopped by `ray job stop` and resubmitted: tests/test_jobs.py.) Each signal is sent once an epoch event shows the stage
training (never after a sleep), to the process group, as a terminal sends it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_until
from kdp.events import read_events
from kdp.interrupt import STOP, Interrupted, check, stoppable

REPO = Path(__file__).resolve().parents[1]
LONG = ["--preset", "tiny", "--set", "classifier.epochs=100", "--quiet"]  # minutes of classifier to stop


def test_a_signal_sets_stop_and_raises_interrupted_with_its_exit_code():
    with stoppable():
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(STOP.is_set, 10, "the handler never ran")
        assert e.value.code == 143 and STOP.is_set()
        with pytest.raises(Interrupted):
            check()  # what every training batch and attacked forward pass calls
    assert not STOP.is_set()  # cleared on leaving the block
    check()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("reap", [True, False])
def test_what_a_command_started_ends_with_it_even_when_its_exit_is_cut_short(reap):
    """An interrupted command's local Ray can be cut short mid-shutdown (a library thread calls
    into it; its core worker ends the process): `reap_at_exit` then ends what the command
    started. Without it (the control) the child outlives the command."""
    code = ("import os, subprocess; from kdp.interrupt import reap_at_exit; "
            "p = subprocess.Popen(['sleep', '120'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid, flush=True); "
            f"{'reap_at_exit(); ' if reap else ''}os._exit(1)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    child = int(done.stdout.split()[0])
    try:
        if reap:
            wait_until(lambda: not _running(child), 30, f"pid {child} outlived the command", interval=0.1)
        else:
            assert _running(child)
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)  # this test's own grandchild


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (the command's session: Ray's processes included)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(d.name))
    return pids


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """In a session of its own, with SIGINT handled by default (a background job of a
    non-interactive shell would start with it ignored)."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _events(run: Path) -> list[dict]:
    """A run's events; for a sweep (a `trials` dir under it), every trial's and the shared
    artifacts' (their started / resumed / finished lines), in time order."""
    runs = ([*sorted((run / "trials").glob("*")), run / "shared"] if (run / "trials").is_dir()
            else [run] if run.is_dir() else [])
    return sorted((e for r in runs for e in read_events(r)), key=lambda e: e["time"])


def _epochs(run: Path, stage: str, status: str) -> list[dict]:
    return [e for e in _events(run) if e["stage"] == stage and e["status"] == status]


def _stop_mid_stage(cmd, run: Path, log: Path, sig: int, after: int) -> tuple[int, float, list[dict]]:
    """Start cmd, send `sig` to its process group once the classifier has ended `after` more
    epochs than before; (exit code, seconds from the signal to the exit, the epoch ends before)."""
    before = len(_epochs(run, "classifier", "epoch_end"))
    proc = _start(cmd, log)
    try:
        wait_until(lambda: len(_epochs(run, "classifier", "epoch_end")) >= before + after, 300,
                   f"no classifier epoch: {log.read_text()[-2000:] if log.exists() else ''}", interval=0.1)
        ends = _epochs(run, "classifier", "epoch_end")
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=120)
        seconds = time.monotonic() - t0
        wait_until(lambda: not _session_pids(proc.pid), 60, f"left running: {_session_pids(proc.pid)}", interval=0.2)
        return rc, seconds, ends
    finally:
        for pid in _session_pids(proc.pid):  # only what this test started (its own session)
            os.kill(pid, signal.SIGKILL)


def _resumed_where_it_stopped(run: Path, ends_before: list[dict], logged_stop: bool = True) -> None:
    """The stage was logged as interrupted (not by a sweep trial, whose actor ends with the
    driver's Ray), then resumed after its last finished epoch k: no epoch starts again from 0
    after the stop, and the earliest is k + 1."""
    statuses = {(e["stage"], e["status"]) for e in _events(run)}
    assert ("classifier", "resumed") in statuses, statuses
    assert ("classifier", "interrupted") in statuses or not logged_stop, statuses
    k = ends_before[-1]["epoch"]
    later = [e["epoch"] for e in _epochs(run, "classifier", "epoch_start") if e["time"] > ends_before[-1]["time"]]
    assert later and 0 not in later and min(later) >= k + 1, (k, later)


def test_ctrl_c_then_sigterm_stop_mid_stage_and_the_same_command_resumes(tmp_path, cifar_subset_dir):
    """Ctrl-C in the classifier's 3rd of 100 epochs: exit 130 within seconds, one resume line,
    no process of the command left. The same command resumes the classifier from its last
    epoch; SIGTERM then stops it the same way with exit 143."""
    cmd = [sys.executable, "-m", "kdp.cli", "run", *LONG, "--data-dir", str(cifar_subset_dir),
           "--out", str(tmp_path / "out")]
    run = tmp_path / "out" / "tiny"
    rc, seconds, ends = _stop_mid_stage(cmd, run, tmp_path / "first.log", signal.SIGINT, after=2)
    out = (tmp_path / "first.log").read_text()
    assert rc == 130, out[-3000:]
    assert seconds < 15, f"{seconds:.1f} s from Ctrl-C to exit"
    assert "interrupted (SIGINT); the same command resumes" in out and "Traceback" not in out, out[-3000:]
    rc, seconds2, _ = _stop_mid_stage(cmd, run, tmp_path / "again.log", signal.SIGTERM, after=1)
    again = (tmp_path / "again.log").read_text()
    assert rc == 143 and seconds2 < 15, (rc, seconds2, again[-3000:])
    assert "interrupted (SIGTERM)" in again
    _resumed_where_it_stopped(run, ends)
    print(f"kdp run: SIGINT -> exit in {seconds:.1f} s, SIGTERM -> exit in {seconds2:.1f} s")


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_stops_on_ctrl_c_and_sigterm_and_resumes(tmp_path, cifar_subset_dir):
    """A one-trial sweep: Ctrl-C of jobs/sweep.py while its shared classifier trains ends the
    sweep and its local Ray (Tune's own handler, which would wait for a last experiment
    checkpoint, is off); `kdp sweep --resume` (the same `run_command`) continues the classifier
    from its last epoch, and SIGTERM stops that too. (A killed sweep resumed from a bucket:
    tests/test_cluster.py.)"""
    out, name = tmp_path / "out", "stop"
    cmd = [sys.executable, "jobs/sweep.py", *LONG, "--variants", "kd_nt", "--beta", "0.5", "--name", name,
           "--data-dir", str(cifar_subset_dir), "--out", str(out)]
    rc, seconds, ends = _stop_mid_stage(cmd, out / name, tmp_path / "first.log", signal.SIGINT, after=2)
    first = (tmp_path / "first.log").read_text()
    assert rc == 130 and seconds < 15, (rc, seconds, first[-3000:])
    assert f"interrupted (SIGINT); add --resume (--name {name} --out {out}) to resume it" in first
    resume = [sys.executable, "-m", "kdp.cli", "sweep", "--resume", "--name", name, "--out", str(out)]
    rc, seconds2, _ = _stop_mid_stage(resume, out / name, tmp_path / "again.log", signal.SIGTERM, after=1)
    assert rc == 143 and seconds2 < 15, (rc, seconds2, (tmp_path / "again.log").read_text()[-3000:])
    _resumed_where_it_stopped(out / name, ends, logged_stop=False)
    print(f"sweep: SIGINT -> exit in {seconds:.1f} s, SIGTERM -> exit in {seconds2:.1f} s")
