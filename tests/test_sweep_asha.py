"""Early stopping in sweeps (`scheduler: asha`): the per-epoch proxy a trial's student reports,
the base config every trial derives from, ASHA's decisions on the student's own epochs, its
rungs kept across a --resume (ray#30838), and the row a stopped trial leaves."""
from __future__ import annotations

import dataclasses
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


def _asha(tmp_path, **kw):
    from kdp.distributed.sweep import StudentASHA

    store = open_storage(tmp_path)
    return StudentASHA(SweepConfig(name="s", **kw), 4, store.root / "s" / "asha-rungs.json", store)


def _result(sched, trial_id, epoch, acc):
    trial = SimpleNamespace(trial_id=trial_id)
    if trial_id not in sched._trial_info:
        sched.on_trial_add(None, trial)
    return sched.on_trial_result(None, trial, {"epoch": epoch, proxy.METRIC: acc})


def test_asha_stops_on_the_students_epochs_never_at_its_last_and_keeps_its_rungs_across_a_resume(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    a = _asha(tmp_path)
    assert _result(a, "t0", 1, 0.5) == TrialScheduler.CONTINUE  # the first at a rung: nothing to compare
    assert _result(a, "t1", 1, 0.2) == TrialScheduler.STOP  # below the rung's top half
    assert _result(a, "t0", 4, 0.0) == TrialScheduler.CONTINUE  # its last epoch: finished, evaluated
    assert [(e["by"], e["epoch"]) for e in read_events(tmp_path / "s") if e["status"] == "asha_stop"] == [("t1", 1)]
    again = _asha(tmp_path)  # a resumed driver: Tune gives it the scheduler as first built
    assert _result(again, "t2", 1, 0.3) == TrialScheduler.STOP  # t0 and t1 still at the rung (cutoff 0.35)
    fresh = _asha(tmp_path / "other")
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
