"""The whole pipeline in one process on the tiny preset (the session's `tiny_run`): its parquet
table, the config and provenance in each row, re-runs that skip every finished stage and keep
the evaluation, `--rescore`, a refused config change and a crashed stage resumed.
Accuracy-level checks of the smoke preset are in benchmarks/smoke_checks.py."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_argv, torch_threads
from kdp import cli
from kdp.attacks import PAPER_SUITE
from kdp.baselines import BASELINES
from kdp.checkpoint import load_checkpoint, read_meta, save_checkpoint
from kdp.events import read_events
from kdp.presets import get_preset
from kdp.results import SCHEMA, load, results_key, table1

VARIANTS = {"none", "at_teacher", "nt_teacher", "kd_at", "kd_nt", "kd_at_nt", *BASELINES}  # every registered baseline
STAGES = ["classifier", "teacher_at", "teacher_nt", "student_kd_at", "student_kd_nt", "student_kd_at_nt",
          *(f"baseline_{b}" for b in BASELINES), "surrogate"]
TINY = get_preset("tiny")
SUITES = {"classifier": ("clean",) + PAPER_SUITE + ("aa-standard",), "full": TINY.eval.adaptive_attacks,
          "transfer": TINY.eval.transfer_attacks}
ROWS = {"classifier": SUITES["classifier"] + ("worst-case",),  # and the ε curve's unbounded point under full
        "full": SUITES["full"] + ("pgd20-eps255", "worst-case"), "transfer": SUITES["transfer"] + ("worst-case",)}


def _copy(run: Path, dest: Path) -> Path:
    """A private copy of a finished run's output root (run dir and caches); returns its run dir."""
    shutil.copytree(run.parent, dest)
    return dest / run.name


def test_a_row_per_variant_attack_and_threat_model(tiny_run):
    df = load(tiny_run / "results.parquet")
    for threat, attacks in ROWS.items():
        sub = df[df.threat_model == threat]
        assert sorted(zip(sub.variant, sub.attack)) == sorted((v, a) for v in VARIANTS for a in attacks), threat
    assert list(df.columns) == SCHEMA.names + ["sweep_id"]
    # aa-standard, and the worst case over a suite that has it, on the first aa_subset images; the curve on its own
    # (at_classifier's `full` worst case counts its `classifier` suite too)
    aa = (df.attack == "aa-standard") | ((df.attack == "worst-case") & ((df.threat_model == "classifier") | (
        (df.threat_model == "full") & (df.variant == "at_classifier"))))
    curve = df.attack == "pgd20-eps255"
    assert (df[aa].n == TINY.eval.aa_subset).all() and (df[curve].n == TINY.eval.indicator_subset).all()
    assert (df[~aa & ~curve].n == TINY.data.n_test).all()
    assert ((df.accuracy - df.correct / df.n).abs() < 1e-12).all() and (df.hits.str.len() == df.n).all()
    assert (df.hits.str.count("1") == df.correct).all() and (df["first"] == 0).all()
    assert (df[df.attack == "aa-standard"]["attack.steps"] == 100).all() and df["attack.settings"].notna().all()
    assert table1(df).shape == (len(SUITES["classifier"]) + 1, len(VARIANTS))  # + worst-case; no curve


def test_rows_carry_indicators_where_they_apply(tiny_run):
    df = load(tiny_run / "results.parquet").set_index(["variant", "threat_model", "attack"])
    assert df["indicators"].notna().all() and df["indicator_notes"].notna().all()
    assert df.loc[("at_teacher", "full", "pgd8"), "indicator.unavailable_gradients"] == False  # noqa: E712
    assert df.loc[("at_teacher", "classifier", "pgd8"), "indicator.unavailable_gradients"] is None
    assert df.loc[("none", "classifier", "autoattack"), "indicator.blackbox_beats_whitebox"] is not None
    assert df.loc[("none", "classifier", "fgsm"), "indicator.silent_success"] is None  # one step: no iterates
    assert df.loc[("none", "full", "pgd8"), "trace.grad_images"] == TINY.eval.batch_size
    fired = df[df["indicators"] != ""]
    assert all(n in df.columns for names in fired["indicators"] for n in (f"indicator.{x}" for x in names.split(",")))


def test_rows_carry_config_and_provenance(tiny_run):
    df = load(tiny_run / "results.parquet")
    row = df[(df.variant == "kd_at_nt") & (df.attack == "pgd8")].iloc[0]
    assert row["purifier.teachers"] == "at+nt" and row["purifier.kind"] == "student"
    assert row["purifier.beta"] == 0.5 and row["purifier.gamma"] == 0.5
    assert math.isclose(row["ae.eps"], 8 / 255) and row["classifier.arch"] == "resnet8"
    assert row["data.train_size"] == TINY.data.n_train and row["preset"] == "tiny" and row["run"] == "tiny"
    assert len(row["git_sha"]) >= 7 and row["torch_version"] and row["torchattacks_version"] == "3.5.1"
    assert row["utc"].endswith("+00:00")
    none = df[df.variant == "none"].iloc[0]
    assert none["purifier.kind"] == "none"
    assert none["purifier.beta"] is None or math.isnan(none["purifier.beta"])


def test_rows_record_checks_and_how_gradients_were_taken(tiny_run):
    df = load(tiny_run / "results.parquet")
    assert df["check.eval_mode"].all() and df["check.linf_ok"].all()
    full = df[(df.threat_model == "full") & (df.attack != "worst-case")].set_index("variant")
    said = full["attack.same_as"].notna()  # at_classifier's classifier rows again: no gradient of their own measured
    assert set(full[said].index) == {"at_classifier"} and full[said]["check.grad_nonzero"].isna().all()
    assert full[~said]["check.grad_nonzero"].all()
    assert set(full.loc[["jpeg", "soap"], "attack.grad"]) == {"bpda"}
    assert set(full.loc[["kd_at_nt", "nrp", "none"], "attack.grad"]) == {"exact"} and (full["attack.eot"] == 1).all()
    crafted = df[~df.attack.isin(("clean", "worst-case")) & (df.threat_model != "full")]
    robust = (crafted.variant == "at_classifier") & (crafted.threat_model == "classifier")  # crafted on itself
    assert crafted[~robust]["check.attack_success"].notna().all() and crafted[robust]["check.attack_ok"].isna().all()
    assert (df["checks_ok"] == (df["check_failures"] == "")).all()


def test_rerun_skips_every_stage_and_keeps_the_evaluation(tiny_run, tmp_path, cifar_subset_dir, capsys):
    run = _copy(tiny_run, tmp_path / "out")
    files = [*(run / s / "model.pt" for s in STAGES), run / "results.parquet"]
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    n_before = len(read_events(run))
    with torch_threads(1):  # with progress lines: none of the first run's epochs may come back
        assert cli.main([a for a in tiny_argv(cifar_subset_dir, run.parent) if a != "--quiet"]) == 0
    console = capsys.readouterr().out.splitlines()  # a table per threat model, n per attack, the report command
    assert not [line for line in console if " epoch " in line]  # the re-run trains nothing and says so
    assert sum("done already" in line for line in console) == len(STAGES) + 2  # + aes, evaluate
    assert [line for line in console if " threat model: accuracy" in line] == [
        f"{t} threat model: accuracy % (n = test images per attack; letters: see below)" for t in SUITES]
    assert any(line.startswith("letters after a number") for line in console)
    assert sum(line.startswith("AA (standard) (n=4) ") for line in console) == 1
    assert any("student KD←AT+NT" in line and "NT teacher" in line for line in console)  # the report's labels
    assert console[-1] == f"full report (intervals, Table 2, plots): kdp report {run} --out {run / 'report'}"
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    later = read_events(run)[n_before:]
    assert sorted((e["stage"], e["status"]) for e in later) == sorted(
        (s, "skipped") for s in [*STAGES, "aes", "evaluate"])


@pytest.mark.slow  # two evaluations of the tiny run, 13 s: CI
def test_rescore_and_a_changed_input_evaluate_again(tiny_run, tmp_path, cifar_subset_dir):
    """--rescore re-scores (the same rows: same models, seeded attacks); new weights in an
    input change the key, so a plain re-run re-scores too."""
    run = _copy(tiny_run, tmp_path / "out")
    parquet = run / "results.parquet"
    before, key = load(parquet), results_key(parquet)
    with torch_threads(1):
        assert cli.main(tiny_argv(cifar_subset_dir, run.parent, "--rescore")) == 0
    after = load(parquet)
    cols = ["variant", "attack", "threat_model"]
    assert after.sort_values(cols)["hits"].tolist() == before.sort_values(cols)["hits"].tolist()
    assert results_key(parquet) == key and after["utc"].iloc[0] >= before["utc"].iloc[0]
    meta = read_meta(run / "student_kd_nt")  # new weights under the same config: the stage is
    model, _ = load_checkpoint(run / "student_kd_nt")  # still finished, but its output changed
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_checkpoint(run / "student_kd_nt", model, meta["spec"], meta["config"], meta["metrics"], meta["provenance"])
    n_before = len(read_events(run))
    with torch_threads(1):
        assert cli.main(tiny_argv(cifar_subset_dir, run.parent)) == 0
    later = {(e["stage"], e["status"]) for e in read_events(run)[n_before:]}
    assert ("evaluate", "started") in later and ("student_kd_nt", "skipped") in later
    assert results_key(parquet) not in (None, key)


def test_same_name_with_another_config_is_refused(tiny_run, cifar_subset_dir, capsys):
    config = (tiny_run / "config.json").read_bytes()
    rc = cli.main(tiny_argv(cifar_subset_dir, tiny_run.parent, "--set", "students.beta=0.3"))
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdp: error:") and "another config" in err and len(err.splitlines()) == 1
    assert (tiny_run / "config.json").read_bytes() == config


def test_a_changed_weights_file_is_refused_before_it_is_trusted(tiny_run, tmp_path, cifar_subset_dir, capsys):
    """A finished stage whose model.pt no longer matches its recorded sha256 is not skipped as
    done: one line names the stage, the file and how to train it again; nothing is rewritten."""
    run = _copy(tiny_run, tmp_path / "out")
    weights = run / "teacher_nt" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed
    weights.write_bytes(bytes(data))
    results = (run / "results.parquet").read_bytes()
    assert cli.main(tiny_argv(cifar_subset_dir, run.parent)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kdp: error: stage teacher_nt:")
    assert f"{weights} does not match the weights_sha256" in err and f"delete {run / 'teacher_nt'}" in err
    assert (run / "results.parquet").read_bytes() == results


def test_crashed_stage_resumes_from_its_last_epoch(tmp_path, cifar_subset_dir, monkeypatch):
    """The NT teacher dies in epoch 3; the re-run skips what finished and redoes only epoch 3."""
    import kdp.stages.common as common
    import kdp.stages.purifier as purifier

    args = tiny_argv(cifar_subset_dir, tmp_path, "--name", "crash", "--set", "data.n_train=256",
                     "--set", "data.n_test=16", "--set", "classifier.epochs=1", "--set", "eval.attacks=fgsm",
                     "--set", "eval.adaptive_attacks=", "--set", "nt_teacher.epochs=4", "--set", "baselines=",
                     "--set", "eval.threat_models=classifier")
    real_train_epoch, real_teacher_step = common.train_epoch, purifier.teacher_step

    def nt_only(cfg, *a):  # arm the crash only inside the NT teacher: it dies in its 3rd epoch
        epochs = []

        def dying_train_epoch(*args, **kw):
            epochs.append(1)
            if len(epochs) == 3:
                raise RuntimeError("simulated crash")
            return real_train_epoch(*args, **kw)

        monkeypatch.setattr(common, "train_epoch", dying_train_epoch if cfg.kind == "nt" else real_train_epoch)
        return real_teacher_step(cfg, *a)

    monkeypatch.setattr(purifier, "teacher_step", nt_only)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(args)
    run = tmp_path / "crash"
    assert (run / "state" / "teacher_nt.pt").exists() and not (run / "teacher_nt").exists()
    monkeypatch.setattr(purifier, "teacher_step", real_teacher_step)
    monkeypatch.setattr(common, "train_epoch", real_train_epoch)
    at_mtime = (run / "teacher_at" / "model.pt").stat().st_mtime_ns
    assert cli.main(args) == 0
    meta = json.loads((run / "teacher_nt" / "checkpoint.json").read_text())
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3, 4]
    assert (run / "teacher_at" / "model.pt").stat().st_mtime_ns == at_mtime
    statuses = [(e["stage"], e["status"]) for e in read_events(run)]
    assert ("teacher_nt", "resumed") in statuses and ("teacher_at", "skipped") in statuses
    assert len(load(run / "results.parquet")) == 6 * 3  # (clean, fgsm, the worst case) x variants


def test_smoke_checks_run_on_rows_and_fail_on_a_broken_one(tiny_run):
    """benchmarks/smoke_checks.py (the smoke preset's accuracy-level checks) reads a run's rows
    and reports a failure when the undefended classifier is no better than chance."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke_checks", Path(__file__).parents[1] / "benchmarks" / "smoke_checks.py")
    smoke_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke_checks)
    df = load(tiny_run / "results.parquet")
    results = dict(smoke_checks.checks(df))
    assert len(results) > 2 * len(VARIANTS)
    clean = (df.variant == "none") & (df.attack == "clean") & (df.threat_model == "classifier")
    df.loc[clean, "accuracy"] = 0.05
    assert dict(smoke_checks.checks(df))["undefended clean accuracy > 0.3 (chance is 0.1)"] is False


def test_a_run_recorded_before_a_config_field_existed_resumes(tmp_path):
    """A run's config.json written before kdp added a field (SOAP's momentum) is the same run
    while the field holds its default; another value is another config, refused."""
    import dataclasses

    from kdp.checkpoint import StageConflict
    from kdp.files import write_json
    from kdp.pipeline import prepare_run

    cfg = get_preset("tiny")
    old = json.loads(json.dumps(dataclasses.asdict(cfg)))
    del old["soap"]["momentum"]
    write_json(tmp_path / "tiny" / "config.json", old)
    assert prepare_run(cfg, tmp_path) == tmp_path / "tiny"
    with pytest.raises(StageConflict, match="exists with another config"):
        prepare_run(dataclasses.replace(cfg, soap=dataclasses.replace(cfg.soap, momentum=0.5)), tmp_path)
