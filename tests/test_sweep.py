"""kdp.sweep without Ray: the search space, trial configs, the locked artifact store, and
trials run in this process on tiny models (sharing, one results file per trial, resume)."""
from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pytest

import kdp.locks as locks
from kdp.config import AEConfig, ClassifierConfig, EvalConfig, Runtime, StudentConfig, TeacherConfig
from kdp.pipeline_config import PipelineConfig
from kdp.events import read_events
from kdp.scheduler import LocalExecutor
from kdp.results import SCHEMA, load
from kdp.sweep import (SweepConfig, ensure, load_sweep_file, run_trial, sweep_from_dict, trial_columns,
                       trial_config)
from kdp.sweep_space import BY_FIELD, KNOBS, Range

REPO = Path(__file__).resolve().parents[1]
CPU = Runtime(device="cpu", progress=False)


@pytest.mark.parametrize("d, needle", [
    ({"variants": "kd_at,kd_xx"}, "'kd_xx'"),
    ({"beta": "-0.5"}, "-0.5"),
    ({"eps": "0"}, "eps value 0.0"),
    ({"eps": "2"}, "eps value 2.0"),
    ({"gamma": "uniform:1:0.5"}, "low < high"),
    ({"gamma": "normal:0:1"}, "'normal:0:1'"),
    ({"kd_space": "pixels,probs"}, "'probs'"),
    ({"betas": [0.5]}, "betas"),
    ({"num_samples": 0}, "num_samples"),
    ({"seeds": "0,x"}, "'0,x'"),
    ({"seeds": []}, "at least one"),
    ({"seeds": [1, 1]}, "distinct"),
])
def test_bad_search_space_names_the_value(d, needle):
    with pytest.raises(ValueError) as e:
        sweep_from_dict(d)
    assert needle in str(e.value)


def parse_dim(field: str, value):
    return BY_FIELD[field].parse(value)


def test_dimensions_parse_grids_fractions_and_ranges():
    assert parse_dim("eps", "4/255,8/255") == (4 / 255, 8 / 255)
    assert parse_dim("beta", [0.25, "1/2"]) == (0.25, 0.5)
    assert parse_dim("gamma", "uniform:0.1:1") == Range("uniform", 0.1, 1.0)
    assert parse_dim("gamma", {"loguniform": [0.01, 1]}) == Range("loguniform", 0.01, 1.0)
    with pytest.raises(ValueError, match="loguniform needs low > 0"):
        parse_dim("beta", "loguniform:0:1")


def test_shipped_sweep_yaml_parses_and_flags_override_it(tmp_path):
    s = load_sweep_file(REPO / "jobs" / "sweep.yaml")
    assert s.variants == ("at_teacher", "kd_at", "kd_nt", "kd_at_nt") and s.eps[1] == pytest.approx(8 / 255)
    assert s.grid_size() == 4 * 3 * 1 * 3
    s2 = load_sweep_file(REPO / "jobs" / "sweep.yaml", beta="0.5", name="other")
    assert s2.beta == (0.5,) and s2.name == "other" and s2.grid_size() == 12
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [0.5\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_sweep_file(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_sweep_file(tmp_path / "nope.yaml")


def _other_value(k):
    """A valid value of knob k other than its default's first."""
    if k.choices:
        return next(c for c in k.choices if c != k.default[0] and c != "at_teacher")
    return k.default[0] + 1 if k.type is int else k.default[0] / 2


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.param)
def test_every_knob_is_a_field_a_flag_a_trial_setting_and_a_column(knob):
    """Each declared knob (kdp.sweep_space.KNOBS) reaches every place from its one record: the
    SweepConfig field and sweep.json, the `kdp sweep` flag, Tune's search space, the trial's
    config, and its typed `sweep.<param>` results column."""
    import argparse

    from kdp.commands import add_sweep_args
    from kdp.distributed.sweep import param_space
    from kdp.sweep import sweep_to_dict

    v = _other_value(knob)
    p = argparse.ArgumentParser()
    add_sweep_args(p)
    args = p.parse_args([knob.flag(), str(v), "--out", "unused"])
    sweep = sweep_from_dict({}, **{knob.field: getattr(args, knob.field)})
    assert getattr(sweep, knob.field) == (v,) and sweep.grid_size() == sweep_from_dict({}).grid_size() // len(
        knob.default)
    assert sweep_from_dict(sweep_to_dict(sweep)) == sweep
    assert set(param_space(sweep)) == {k.param for k in KNOBS}
    params = {k.param: k.default[0] for k in KNOBS} | {"variant": "kd_at_nt"}
    base = PipelineConfig(name="sw", students=(StudentConfig(),))
    assert trial_config(base, {**params, knob.param: v}, "t") != trial_config(base, params, "t")
    if knob.apply.__qualname__.startswith("student_knob"):
        assert getattr(trial_config(base, {**params, knob.param: v}, "t").students[0], knob.param) == v
    col = f"sweep.{knob.param}"
    assert trial_columns({**params, knob.param: v}, "t")[col] == v
    assert pa.array([v]).type == SCHEMA.field(col).type and isinstance(sweep, SweepConfig)


def test_trial_config_sets_eps_alpha_and_the_student():
    base = PipelineConfig(name="sw", ae=AEConfig(eps=8 / 255, alpha=2 / 255),
                          students=(StudentConfig(epochs=7, width=16),))
    at_only = trial_config(base, {"variant": "at_teacher", "beta": 0.1, "gamma": 0.2, "eps": 4 / 255,
                                  "kd_space": "pixels"}, "t0")
    assert at_only.students == () and at_only.ae.eps == pytest.approx(4 / 255)
    assert at_only.ae.alpha == pytest.approx(1 / 255) and at_only.name == "sw-t0"
    kd = trial_config(base, {"variant": "kd_at_nt", "beta": 0.1, "gamma": 0.2, "eps": 16 / 255,
                             "kd_space": "logits"}, "t1")
    (s,) = kd.students
    assert (s.teachers, s.beta, s.gamma, s.kd_space, s.epochs, s.width) == (("at", "nt"), 0.1, 0.2, "logits", 7, 16)
    assert kd.at_teacher == base.at_teacher and kd.ae.alpha == pytest.approx(4 / 255)


def test_seeds_are_a_grid_dimension_that_reseeds_the_trial():
    s = sweep_from_dict({"variants": "kd_at,kd_nt", "seeds": "0,1,2"})
    assert s.seeds == (0, 1, 2) and s.grid_size() == 2 * 3
    assert sweep_from_dict({"seeds": [3, 4]}).seeds == (3, 4) and sweep_from_dict({}).seeds == (0,)
    base = PipelineConfig(name="sw", students=(StudentConfig(epochs=7),))
    p = {"variant": "kd_at", "beta": 0.5, "gamma": 0.5, "eps": 8 / 255, "kd_space": "pixels", "seed": 2}
    cfg = trial_config(base, p, "t2")
    assert cfg.name == "sw-t2" and cfg.seed == 2 and cfg.students[0].seed == 2 and cfg.eval.seed == 2
    assert cfg.at_teacher.seed == 2 and cfg.classifier == base.classifier and cfg.ae == base.ae
    assert trial_columns(p, "t2")["sweep.seed"] == 2
    # a base with no student: the trial's student (from StudentConfig's defaults) is reseeded too
    assert trial_config(PipelineConfig(name="sw", students=()), p, "t3").students[0].seed == 2


def test_ensure_makes_once_under_concurrency_and_survives_a_crashed_maker(tmp_path, monkeypatch):
    """Four callers at once: one makes; the other three find the lock held, say they wait for
    the maker, and reuse its artifact."""
    monkeypatch.setattr(locks, "POLL_S", 0.02)  # waiters notice the released lock at once
    out, calls, lines = tmp_path / "artifact", [], []
    waiting = threading.Semaphore(0)  # released by each caller that logs its wait

    def logger(who):
        def log(line):
            lines.append((who, line))
            if line.endswith(" is making it; waiting"):
                waiting.release()
        return log

    def make():
        calls.append(threading.get_ident())
        for _ in range(3):  # hold the lock until every other caller waits on it
            assert waiting.acquire(timeout=60), f"not every caller waited: {lines}"
        tmp = tmp_path / "tmp-artifact"
        tmp.mkdir()
        tmp.rename(out)

    results, errors = [], []

    def call(i):
        try:
            results.append(ensure(out, out.exists, make, tmp_path, "thing", f"t{i}", log=logger(f"t{i}")))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(calls) == 1 and results == [out] * 4, errors
    events = read_events(tmp_path)
    assert sorted(e["status"] for e in events) == ["finished", "reused", "reused", "reused", "started"]
    (maker,) = {e["by"] for e in events if e["status"] in ("started", "finished")}
    waiters = {e["by"] for e in events if e["status"] == "reused"}
    assert waiters == {f"t{i}" for i in range(4)} - {maker}
    waited = [(who, line) for who, line in lines if line.endswith(" is making it; waiting")]
    assert sorted(who for who, _ in waited) == sorted(waiters), lines  # each waiter said so, once; the maker never
    assert all(line.startswith("[thing] ") for _, line in waited), waited

    other = tmp_path / "other"

    def crash():
        raise RuntimeError("maker died")
    with pytest.raises(RuntimeError):
        ensure(other, other.exists, crash, tmp_path, "other", "a", log=lambda *_: None)
    assert not other.exists()  # nothing half-made; the lock died with the failed maker
    ensure(other, other.exists, lambda: other.mkdir(), tmp_path, "other", "b", log=lambda *_: None)
    assert other.is_dir()


def _tiny_base(name="sw") -> PipelineConfig:
    cae = dict(depth=1, width=4, epochs=1, batch_size=64)
    return PipelineConfig(
        name=name, classifier=ClassifierConfig(arch="resnet8", width=4, epochs=1, batch_size=64),
        ae=AEConfig(steps=2, batch_size=64), at_teacher=TeacherConfig(kind="at", **cae),
        nt_teacher=TeacherConfig(kind="nt", **cae), students=(StudentConfig(**cae),),
        eval=EvalConfig(attacks=("fgsm",), adaptive_attacks=(), batch_size=32))


def _events(path: Path) -> list[dict]:
    return read_events(path)


def test_trials_share_inputs_and_write_one_file_each(tmp_path, tiny_data):
    base, be = _tiny_base(), LocalExecutor()
    p = {"beta": 0.5, "gamma": 0.5, "eps": 8 / 255, "kd_space": "pixels"}
    quiet = dict(rt=CPU, log=lambda *_: None)
    files = [run_trial(base, {**p, "variant": "kd_nt"}, tmp_path, "t0", be, tiny_data, **quiet),
             run_trial(base, {**p, "variant": "at_teacher"}, tmp_path, "t1", be, tiny_data, **quiet),
             run_trial(base, {**p, "variant": "kd_at", "eps": 4 / 255}, tmp_path, "t2", be, tiny_data, **quiet)]
    shared = _events(tmp_path / "sw" / "shared")
    made = {}
    for e in shared:
        if e["status"] == "finished":
            made.setdefault(e["stage"], []).append(e["path"])
    assert {k: len(v) for k, v in made.items()} == {"classifier": 1, "teacher_nt": 1, "aes": 2, "teacher_at": 2}
    assert len(list((tmp_path / "sw" / "shared").glob("teacher_at-*/checkpoint.json"))) == 2

    df = load(tmp_path / "results")
    assert len(df) == 3 * 3 and set(df.sweep_id) == {"sw"}  # 3 trials x (clean, fgsm, the worst case)
    assert df.groupby("trial_id").variant.first().to_dict() == {"t0": "kd_nt", "t1": "at_teacher", "t2": "kd_at"}
    assert df[df.trial_id == "t2"]["ae.eps"].iloc[0] == pytest.approx(4 / 255)
    assert df[df.trial_id == "t0"]["purifier.teachers"].iloc[0] == "nt"
    assert [f.parent.name for f in files] == ["sweep_id=sw"] * 3 and len({f.name for f in files}) == 3

    before = {f: f.stat().st_mtime_ns for f in files}
    again = run_trial(base, {**p, "variant": "kd_nt"}, tmp_path, "t0", be, tiny_data, **quiet)
    assert again == files[0] and {f: f.stat().st_mtime_ns for f in files} == before
    assert _events(tmp_path / "sw")[-1]["status"] == "skipped"


def test_naive_trials_train_their_own_inputs(tmp_path, tiny_data):
    base, be = _tiny_base("naive"), LocalExecutor()
    p = {"beta": 0.5, "gamma": 0.5, "eps": 8 / 255, "kd_space": "pixels", "variant": "at_teacher"}
    for t in ("a", "b"):
        run_trial(base, p, tmp_path, t, be, tiny_data, CPU, share=False, log=lambda *_: None)
    assert len(list((tmp_path / "naive" / "trials").glob("*/own/classifier-*/model.pt"))) == 2


def test_load_reads_many_sweeps_with_fixed_types(tmp_path, tiny_data):
    """The results root reads as one table in pyarrow.dataset, pandas, polars and duckdb."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    be = LocalExecutor()
    p = {"beta": 0.5, "gamma": 0.5, "eps": 8 / 255, "kd_space": "pixels"}
    for sweep, variant in (("s1", "at_teacher"), ("s2", "kd_nt")):
        run_trial(_tiny_base(sweep), {**p, "variant": variant}, tmp_path, "t0", be, tiny_data, CPU, log=lambda *_: None)
    root = tmp_path / "results"
    df = load(root)
    assert len(df) == 6 and sorted(df.sweep_id.unique()) == ["s1", "s2"]  # (clean, fgsm, worst case) x 2
    assert df["accuracy"].dtype == "float64" and df["n"].dtype == "int64" and df["sweep.beta"].dtype == "float64"
    table = load(root / "sweep_id=s2", as_table=True)
    assert isinstance(table, pa.Table) and table.num_rows == 3 and set(table["sweep_id"].to_pylist()) == {"s2"}
    assert table.schema.names == SCHEMA.names + ["sweep_id"]

    hive = ds.partitioning(pa.schema([("sweep_id", pa.string())]), flavor="hive")
    assert ds.dataset(root, format="parquet", partitioning=hive).count_rows() == 6
    assert len(pd.read_parquet(root)) == 6
    assert pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True).collect().height == 6
    n, sweeps = duckdb.sql(f"select count(*), count(distinct sweep_id) from "
                           f"read_parquet('{root}/**/*.parquet', hive_partitioning=true)").fetchall()[0]
    assert (n, sweeps) == (6, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no .parquet files"):
        load(tmp_path / "empty")


def test_a_new_student_knob_is_one_declaration():
    """What docs/extending.md's `student_knob` line gives, for a student field not swept today
    (the learning rate): its values parsed and checked, and the trial's student set by it."""
    from kdp.sweep_space import student_knob

    lr = student_knob("lr", float, (0.01,), "Adam's learning rate.", ranged=True, bounds=(0.0, 1.0, False))
    assert lr.flag() == "--lr" and lr.parse("1e-3,1/100") == (0.001, 0.01)
    assert lr.parse("loguniform:1e-4:1e-2") == Range("loguniform", 1e-4, 1e-2)
    with pytest.raises(ValueError, match=r"sweep lr value 0.0 out of range \(\(0, 1\]\)"):
        lr.parse("0")
    base = trial_config(PipelineConfig(name="sw"), {"variant": "kd_at"}, "t")
    assert lr.apply(base, 0.002).students[0].lr == 0.002 and lr.apply(base, 0.002).students[0].teachers == ("at",)
