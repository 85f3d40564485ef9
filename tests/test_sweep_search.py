"""How a sweep chooses its trials (`search`: grid, random, optuna): the search space Tune gets and
the metric checked before Ray starts. (An Optuna sweep interrupted and resumed, its study going on
where it was: tests/test_sweep_asha.py, under ASHA.)"""
from __future__ import annotations

import sys

import pytest

from kdp.errors import ConfigError
from kdp.presets import build_config
from kdp.sweep import SweepConfig, require_optuna, sweep_metric



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
