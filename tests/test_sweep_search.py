"""How a sweep chooses its trials (`search`: grid, random, optuna): the search space Tune gets,
the metric checked before Ray starts, and an Optuna sweep interrupted after its first trial and
resumed: the study goes on where it was (Tune saves the searcher with the experiment)."""
from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_until
from kdp.errors import ConfigError
from kdp.presets import build_config
from kdp.results import load
from kdp.sweep import SweepConfig, require_optuna, sweep_metric
from test_interrupt import _session_pids, _start

REPO = Path(__file__).resolve().parents[1]


def test_the_search_decides_the_trials_and_tunes_space(cifar_subset_dir):
    from kdp.distributed.sweep import param_space, searcher

    grid = SweepConfig(variants=("kd_nt",), beta=(0.25, 0.5), gamma=(0.5, 1.0), num_samples=2)
    assert grid.grid_size() == 8 and param_space(grid)["beta"] == {"grid_search": [0.25, 0.5]}
    for search in ("random", "optuna"):
        s = SweepConfig(search=search, beta=(0.25, 0.5), gamma=(0.5, 1.0), num_samples=3)
        assert s.grid_size() == 3 and sorted(param_space(s)["beta"].categories) == [0.25, 0.5]
    assert searcher(grid) is None and type(searcher(SweepConfig(search="optuna"))).__name__ == "FinalResultOptuna"
    with pytest.raises(ConfigError, match="search must be one of grid, random, optuna, got 'bayes'"):
        SweepConfig(search="bayes")


def test_a_metric_no_trial_reports_is_one_line_naming_the_valid_ones(cifar_subset_dir):
    base = build_config("tiny", cifar_subset_dir, "s", [])
    assert sweep_metric(SweepConfig(search="optuna"), base) == f"acc/{base.eval.attacks[0]}"
    assert sweep_metric(SweepConfig(metric="acc_full/worst-case"), base) == "acc_full/worst-case"
    with pytest.raises(ConfigError, match=r"--metric acc/apgd: not a result a trial reports; valid: acc/clean, "):
        sweep_metric(SweepConfig(metric="acc/apgd"), base)


def test_optuna_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ConfigError, match=r"--search optuna needs Optuna: pip install optuna"):
        require_optuna()


def _results(out: Path, name: str) -> list[Path]:
    part = out / "results" / f"sweep_id={name}"
    return sorted(part.glob("*.parquet")) if part.is_dir() else []


@pytest.mark.slow  # two tiny trials through Tune and Optuna, stopped after the first: about 70 s on 2 cores
@pytest.mark.ray
def test_an_optuna_sweep_stopped_after_its_first_trial_resumes_its_study(tmp_path, cifar_subset_dir):
    out, name = tmp_path / "out", "opt"
    cmd = [sys.executable, "jobs/sweep.py", "--preset", "tiny", "--quiet", "--variants", "kd_nt", "--beta",
           "0.25,0.5,1.0", "--gamma", "0.5,1.0", "--search", "optuna", "--num-samples", "2", "--max-concurrent", "1",
           "--name", name, "--data-dir", str(cifar_subset_dir), "--out", str(out)]
    proc = _start(cmd, tmp_path / "first.log")
    try:
        wait_until(lambda: len(_results(out, name)) >= 1 or proc.poll() is not None, 600,
                   f"no trial finished: {(tmp_path / 'first.log').read_text()[-3000:]}", interval=0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
        wait_until(lambda: not _session_pids(proc.pid), 60, "left running", interval=0.2)
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
    first = len(_results(out, name))
    assert first == 1
    start = time.monotonic()
    again = _start([sys.executable, "-m", "kdp.cli", "sweep", "--resume", "--name", name, "--out", str(out)],
                   tmp_path / "again.log")
    assert again.wait(timeout=900) == 0, (tmp_path / "again.log").read_text()[-3000:]
    rows = load(out)
    assert rows["trial_id"].nunique() == 2 and len(_results(out, name)) == 2  # none run twice, none lost
    assert set(rows["sweep.beta"]) <= {0.25, 0.5, 1.0} and set(rows["sweep.gamma"]) <= {0.5, 1.0}
    states = sorted((out / name / "tune").glob("searcher-state-*.pkl"))
    assert states, list((out / name / "tune").iterdir())
    study = pickle.loads(states[-1].read_bytes())["_ot_study"]
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2  # the study knew the first trial
    print(f"optuna sweep: {first} trial(s) before the stop, the rest in {time.monotonic() - start:.0f} s")
