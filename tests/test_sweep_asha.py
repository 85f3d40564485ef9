"""Early stopping in sweeps (`scheduler: asha`): the per-epoch proxy a trial's student reports,
the base config every trial derives from, ASHA's decisions on the student's own epochs, its
rungs kept across a --resume (ray#30838), and the row a stopped trial leaves."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from kdp import proxy
from kdp.data import load_cifar
from kdp.errors import ConfigError
from kdp.events import read_events
from kdp.presets import build_config
from kdp.results import load
from kdp.storage import open_storage
from kdp.sweep import SweepConfig, record_stopped, trial_base


def _base(cifar_subset_dir, epochs=3):
    return build_config("tiny", cifar_subset_dir, "s", [f"students.epochs={epochs}"])


def test_asha_makes_every_student_measure_the_proxy_of_the_metrics_threat(cifar_subset_dir):
    base = _base(cifar_subset_dir)
    assert trial_base(SweepConfig(name="a"), base).students == base.students  # none: nothing measured
    st = trial_base(SweepConfig(name="a", scheduler="asha", proxy_n=16), base).students[0]
    assert (st.proxy_n, st.proxy_threat) == (16, "classifier")
    full = trial_base(SweepConfig(name="a", scheduler="asha", metric="acc_full/worst-case"), base).students[0]
    assert (full.proxy_n, full.proxy_threat) == (base.data.n_test, "full")  # 64 clamped to the run's 32
    with pytest.raises(ConfigError, match=r"--grace-epochs 3: ASHA needs it below the students' epochs \(3\)"):
        trial_base(SweepConfig(scheduler="asha", grace_epochs=3), base)
    with pytest.raises(ConfigError, match="scheduler must be one of none, asha, got 'pbt'"):
        SweepConfig(scheduler="pbt")


def _asha(tmp_path, base):
    from kdp.distributed.sweep import StudentASHA

    store = open_storage(tmp_path)
    s = SweepConfig(name="s", scheduler="asha", proxy_n=32)
    return StudentASHA(s, trial_base(s, base), store.root / "s" / "asha-rungs.json", store)


def _result(sched, trial_id, epoch, acc):
    trial = SimpleNamespace(trial_id=trial_id, config={"variant": "kd_at_nt", "beta": 0.5})
    if trial_id not in sched._trial_info:
        sched.on_trial_add(None, trial)
    return sched.on_trial_result(None, trial, {"epoch": epoch, proxy.METRIC: acc})


def test_asha_stops_on_the_students_epochs_never_at_its_last_and_keeps_its_rungs_across_a_resume(tmp_path,
                                                                                                 cifar_subset_dir):
    from ray.tune.schedulers import TrialScheduler

    base = _base(cifar_subset_dir, epochs=4)
    a = _asha(tmp_path, base)
    assert _result(a, "t0", 1, 0.5) == TrialScheduler.CONTINUE  # the first at a rung: nothing to compare
    assert _result(a, "t1", 1, 0.25) == TrialScheduler.STOP  # below the rung's top half: its row at once
    assert _result(a, "t0", 4, 0.0) == TrialScheduler.CONTINUE  # its last epoch: finished, evaluated
    assert [(e["by"], e["epoch"]) for e in read_events(tmp_path / "s") if e["status"] == "stopped"] == [("t1", 1)]
    assert load(tmp_path / "results")[["trial_id", "stopped_epoch", "correct"]].values.tolist() == [["t1", 1, 8]]
    again = _asha(tmp_path, base)  # a resumed driver: Tune gives it the scheduler as first built
    assert _result(again, "t2", 1, 0.3) == TrialScheduler.STOP  # t0 and t1 still at the rung (cutoff 0.375)
    fresh = _asha(tmp_path / "other", base)
    assert _result(fresh, "t2", 1, 0.3) == TrialScheduler.CONTINUE  # what Tune alone would do (ray#30838)


def test_a_stopped_trial_leaves_one_row_of_its_proxy_and_stopped_epoch(tmp_path, cifar_subset_dir):
    base = trial_base(SweepConfig(name="s", scheduler="asha", proxy_n=32), _base(cifar_subset_dir))
    params = {"variant": "kd_at_nt", "beta": 1.0}
    last = {"epoch": 2, proxy.METRIC: 0.25, "trial_id": "t1"}
    path = record_stopped(base, params, "t1", last, tmp_path)
    assert record_stopped(base, params, "t1", last, tmp_path) is None  # a resumed driver writes none again
    rows = load(tmp_path / "results")
    assert len(rows) == 1 and path.name.startswith("trial-t1-")
    r = rows.iloc[0]
    assert (r["attack"], r["threat_model"], r["n"], r["correct"], r["stopped_epoch"]) == (proxy.ATTACK, "classifier",
                                                                                           32, 8, 2)
    assert (r["sweep.beta"], r["purifier.beta"], r["purifier.proxy_n"], r["sweep_id"]) == (1.0, 1.0, 32, "s")


def test_the_proxy_changes_no_weight_and_reports_each_epoch(tiny_run, cifar_subset_dir):
    import torch

    from kdp.checkpoint import read_meta
    from kdp.config import Runtime
    from kdp.stages.common import train_recipe
    from kdp.stages.purifier import student_recipe

    tiny = build_config("tiny", None, "tiny", [])
    cfg, data = tiny.students[0], load_cifar(cifar_subset_dir, tiny.data.n_train, tiny.data.n_test)
    inputs = {"classifier": tiny_run / "classifier", "aes": read_meta(tiny_run / "student_kd_at_nt")["metrics"]["ae_dir"],
              **{f"teacher_{k}": tiny_run / f"teacher_{k}" for k in ("at", "nt")}}
    rt, weights = Runtime(device="cpu", progress=False), []
    for n, threat in ((0, "classifier"), (8, "classifier"), (8, "full")):
        st = dataclasses.replace(cfg, epochs=2, proxy_n=n, proxy_threat=threat)
        recipe = student_recipe(st, inputs, data, torch.device("cpu"), rt)
        history = train_recipe(st, recipe, recipe.model, rt, "student")
        assert [proxy.METRIC in h for h in history] == [n > 0] * 2
        assert all(0 <= h.get(proxy.METRIC, 0) <= 1 for h in history)
        weights.append(torch.cat([p.flatten() for p in recipe.model.state_dict().values() if p.is_floating_point()]))
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    with pytest.raises(ConfigError, match="proxy_n 33: more than the 32 test images the run has"):
        student_recipe(dataclasses.replace(cfg, proxy_n=33), inputs, data, torch.device("cpu"), rt)


def _decided(sweep_dir) -> dict:
    """Trial id -> how it ended so far: 'finished' or 'stopped' (by ASHA; the sweep's event log)."""
    return {e["by"]: e["status"] for e in read_events(sweep_dir) if e["status"] in ("finished", "stopped")}


@pytest.mark.slow  # three tiny trials of three epochs through Tune, stopped after two and resumed: about 100 s
@pytest.mark.ray
def test_an_optuna_sweep_under_asha_stopped_and_resumed_keeps_its_study_and_stops_and_reruns_nothing(
        tmp_path, cifar_subset_dir):
    """Ctrl-C once one trial finished and ASHA stopped another (Optuna's seeded draws: beta 2, then
    0.1, whose student falls behind at epoch 1: this config's numbers); --resume runs the third
    only: the study and ASHA's rungs go on from where they were (ray#30838: Tune restores no
    scheduler state)."""
    import os
    import pickle
    import signal
    import sys

    from conftest import wait_until
    from test_interrupt import _session_pids, _start

    out, name = tmp_path / "out", "asha"
    sweep_dir = out / name
    cmd = [sys.executable, "jobs/sweep.py", "--preset", "tiny", "--quiet", "--variants", "kd_at_nt", "--beta",
           "0.1,2", "--gamma", "0.5", "--search", "optuna", "--num-samples", "3", "--scheduler", "asha",
           "--max-concurrent", "1", "--set", "students.epochs=3", "--name", name, "--data-dir", str(cifar_subset_dir),
           "--out", str(out)]
    proc = _start(cmd, tmp_path / "first.log")
    try:
        wait_until(lambda: len(_decided(sweep_dir)) >= 2 or proc.poll() is not None, 600,
                   f"two trials never ended: {(tmp_path / 'first.log').read_text()[-3000:]}", interval=0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
        wait_until(lambda: not _session_pids(proc.pid), 60, "left running", interval=0.2)
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
    before = _decided(sweep_dir)
    assert sorted(before.values()) == ["finished", "stopped"], before
    rungs = json.loads((sweep_dir / "asha-rungs.json").read_text())
    again = _start([sys.executable, "-m", "kdp.cli", "sweep", "--resume", "--name", name, "--out", str(out)],
                   tmp_path / "again.log")
    assert again.wait(timeout=900) == 0, (tmp_path / "again.log").read_text()[-3000:]
    started = [e["by"] for e in read_events(sweep_dir) if e["status"] == "started"]
    assert all(started.count(t) == 1 for t in before) and len(set(started)) == 3, started  # none ran twice
    rows = load(out / "results")
    ends = rows.groupby("trial_id")["stopped_epoch"].agg(lambda s: set(s.dropna()))
    assert len(ends) == 3 and len(list((out / "results" / f"sweep_id={name}").glob("*.parquet"))) == 3
    for trial, how in before.items():
        assert bool(ends[trial]) == (how == "stopped"), ends  # one proxy row at its stop; else evaluated
    stopped = rows[rows.stopped_epoch.notna()]
    assert set(stopped.attack) == {proxy.ATTACK} and (stopped.groupby("trial_id").size() == 1).all()
    after = json.loads((sweep_dir / "asha-rungs.json").read_text())
    assert all(after[m].items() >= seen.items() for m, seen in rungs.items()), (rungs, after)  # ray#30838
    states = sorted((sweep_dir / "tune").glob("searcher-state-*.pkl"))
    study = pickle.loads(states[-1].read_bytes())["_ot_study"]
    assert sorted(t.state.name for t in study.trials) == sorted(
        "PRUNED" if ends[t] else "COMPLETE" for t in ends.index)  # the study knew the first two
