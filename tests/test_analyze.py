"""kdp.analyze: the blend fit on synthetic tensors, and the blend test on a tiny run directory
(untrained tiny models saved the way the stages save them; real CIFAR-10 subset images)."""
from __future__ import annotations

import argparse
import json
import re
import math

import pytest
import torch

from kdp.analyze import (add_analyze_args, analyze, analyze_command, analyze_run, blend_markdown, find_blends,
                         fit_blend)
from kdp.attacks import attack_batches, build_attack
from kdp.checkpoint import load_frozen, save_checkpoint
from kdp.files import write_json
from kdp.config import StudentConfig
from kdp.configio import flatten
from kdp.data import to_float
from kdp.models import build_model

# the affine head: an untrained literal-head CAE can output all zeros (ReLU then tanh)
CAE = {"kind": "purifier", "name": "cae", "kwargs": {"depth": 2, "width": 4, "head": "affine"}}
CLF = {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}
N_TEST, EVAL_BS = 16, 8


def _images(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


# ---------------------------------------------------------------- fit_blend

def test_fit_blend_recovers_known_coefficients():
    x, t_at, t_nt = _images(0), _images(1), _images(2)
    fit = fit_blend(0.4 * x + 0.5 * t_at + 0.1 * t_nt, x, t_at, t_nt)
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((0.4, 0.5, 0.1), abs=1e-6)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-6) and fit["rmse"] < 1e-6 and fit["n"] == 6


def test_fit_blend_noise_lowers_r2():
    x, t_at, t_nt = _images(0), _images(1), _images(2)
    s = 0.4 * x + 0.5 * t_at + 0.1 * t_nt + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    fit = fit_blend(s, x, t_at, t_nt)
    assert 0 < fit["r2"] < 0.9 and fit["rmse"] == pytest.approx(0.2, rel=0.05)
    assert fit["b"] == pytest.approx(0.5, abs=0.05)


def test_fit_blend_survives_degenerate_inputs():
    x = _images(0)
    fit = fit_blend(x, x, x, x)  # three identical regressors: rank 1
    assert all(math.isfinite(fit[k]) for k in ("a", "b", "c"))
    assert fit["a"] + fit["b"] + fit["c"] == pytest.approx(1.0, abs=1e-6) and fit["r2"] == pytest.approx(1.0)
    const = fit_blend(torch.full_like(x, 0.5), x, x, x)  # constant output: R² undefined, no crash
    assert math.isnan(const["r2"])
    with pytest.raises(ValueError, match="one shape"):
        fit_blend(x, x, x, x[:2])


# ---------------------------------------------------------------- a tiny run

def _save(path, spec, seed, config):
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(spec["kind"], spec["name"], **spec["kwargs"]), spec, config)


@pytest.fixture(scope="module")
def blend_run(tmp_path_factory, cifar_subset_dir):
    """A run dir with a classifier, two teachers and three students (the third a copy of the
    AT teacher's weights, so its blend must be b = 1)."""
    root = tmp_path_factory.mktemp("runs")
    run = root / "tiny"
    # only the parts of a PipelineConfig's config.json that the blend test reads
    write_json(run / "config.json", {"name": "tiny", "eval": {"batch_size": EVAL_BS, "seed": 3},
                                     "data": {"data_dir": str(cifar_subset_dir), "n_train": 64, "n_test": N_TEST}})
    _save(run / "classifier", CLF, 0, {})
    _save(run / "teacher_at", CAE, 1, {"kind": "at"})
    _save(run / "teacher_nt", CAE, 2, {"kind": "nt"})
    for seed, teachers in ((3, ("nt",)), (4, ("at", "nt"))):
        s = StudentConfig(depth=2, width=4, head="affine", teachers=teachers, beta=0.3, gamma=0.7)
        _save(run / f"student_{s.variant}", CAE, seed, flatten(s))
    s = StudentConfig(depth=2, width=4, head="affine", teachers=("at",))
    _save(run / f"student_{s.variant}", CAE, 1, flatten(s))  # same init seed as teacher_at: same weights
    (root / "not_a_run").mkdir()
    return root, run


def test_analyze_run_records(blend_run, tiny_data):
    _, run = blend_run
    recs = {r["variant"]: r for r in analyze_run(run, tiny_data, n=N_TEST)}
    assert set(recs) == {"kd_at", "kd_nt", "kd_at_nt"}
    r = recs["kd_at_nt"]
    assert r["teachers"] == ["at", "nt"] and (r["beta"], r["gamma"], r["kd_space"]) == (0.3, 0.7, "pixels")
    assert recs["kd_nt"]["teachers"] == ["nt"] and recs["kd_at"]["teachers"] == ["at"]
    for r in recs.values():
        assert {"run", "variant", "attack", "n", "a", "b", "c", "r2", "rmse", "teachers", "beta", "gamma",
                "kd_space"} <= set(r)
        assert r["run"] == "tiny" and r["attack"] == "pgd8" and r["n"] == N_TEST
        assert all(math.isfinite(r[k]) for k in ("a", "b", "c", "r2", "rmse")) and r["r2"] <= 1 + 1e-9
    # the student with the AT teacher's weights is exactly T_AT(x'): so the AT teacher is fed x'
    assert (recs["kd_at"]["a"], recs["kd_at"]["b"], recs["kd_at"]["c"]) == pytest.approx((0, 1, 0), abs=1e-4)
    assert recs["kd_at"]["r2"] == pytest.approx(1, abs=1e-6)


def test_analyze_run_matches_a_direct_fit(blend_run, tiny_data):
    """Same AEs as the eval (classifier, eval seed and batch size), AT fed x', NT fed x."""
    _, run = blend_run
    load = lambda name: load_frozen(run / name)  # noqa: E731
    clf, t_at, t_nt, s = (load(d) for d in ("classifier", "teacher_at", "teacher_nt", "student_kd_at_nt"))
    x, y = to_float(tiny_data.test_x[:N_TEST]), tiny_data.test_y[:N_TEST]
    xa = torch.cat(list(attack_batches(build_attack("pgd8", clf), x, y, EVAL_BS, 3)))
    with torch.no_grad():
        want = fit_blend(s(xa), x, t_at(xa), t_nt(x))
    got = next(r for r in analyze_run(run, tiny_data, n=N_TEST) if r["variant"] == "kd_at_nt")
    for k in ("a", "b", "c", "r2", "rmse"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7)


def test_analyze_writes_blend_json_and_find_blends_reads_it(blend_run):
    root, run = blend_run
    recs = analyze(root, attack="fgsm", n=4)  # a directory of runs; data read from the run's config
    assert len(recs) == 3 and {r["n"] for r in recs} == {4}
    blob = json.loads((run / "blend.json").read_text())
    assert blob["attack"] == "fgsm" and len(blob["records"]) == 3 and "git_sha" in blob["provenance"]
    assert {r["variant"] for r in find_blends(root)} == {"kd_at", "kd_nt", "kd_at_nt"}
    assert len(find_blends(run / "results.parquet")) == 3  # a parquet path: its directory
    assert find_blends(root / "not_a_run") == []


def test_bad_paths_raise_value_error(blend_run):
    root, _ = blend_run
    for bad in (root / "missing", root / "not_a_run"):
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            analyze(bad)


def test_blend_markdown_and_command(blend_run, capsys):
    root, run = blend_run
    p = argparse.ArgumentParser()
    add_analyze_args(p)
    analyze_command(p.parse_args([str(run), "--n", "4", "--attack", "fgsm"]))
    out = capsys.readouterr().out
    assert f"blend: {run / 'blend.json'}" in out and "| kd_at_nt | at+nt |" in out
    recs = find_blends(run)
    md = blend_markdown(recs)
    for r in recs:
        assert r["variant"] in md and all(f"{r[k]:.3f}" in md for k in ("a", "b", "c", "r2", "rmse"))
    assert "R²" in md and "T_NT(x)" in md and "n/a" not in md
    with pytest.raises(ValueError, match="attack"):
        analyze_command(p.parse_args([str(run), "--attack", "nope"]))
