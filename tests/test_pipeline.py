"""The whole pipeline on the real CIFAR-10 subset: the smoke preset through the CLI, its
parquet table, skipping finished stages, and resuming a crashed stage."""
import json
import math
from pathlib import Path

import pytest

from kdp import cli
from kdp.attacks import LINF_EPS, PAPER_SUITE
from kdp.events import read_events
from kdp.results import SCHEMA, load, table1

pytestmark = pytest.mark.slow  # one module-scoped smoke run (minutes) feeds every test

VARIANTS = {"none", "at_teacher", "nt_teacher", "kd_at", "kd_nt", "kd_at_nt", "jpeg", "nrp", "soap"}
STAGES = ["classifier", "teacher_at", "teacher_nt", "student_kd_at", "student_kd_nt", "student_kd_at_nt",
          "baseline_jpeg", "baseline_nrp", "baseline_soap", "surrogate"]
CLASSIFIER_SUITE = ("clean",) + PAPER_SUITE + ("aa-standard",)
SMOKE_FULL, SMOKE_TRANSFER = {"pgd8", "aa-standard"}, {"pgd8", "fgsm"}
AA_SUBSET = 50  # the smoke preset's eval.aa_subset


def _stages(run_dir: Path) -> list[dict]:
    return read_events(run_dir)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cifar_subset_dir):
    out = tmp_path_factory.mktemp("smoke")
    rc = cli.main(["run", "--preset", "smoke", "--data-dir", str(cifar_subset_dir), "--out", str(out), "--quiet"])
    assert rc == 0
    return out / "smoke"


def test_smoke_parquet_has_a_row_per_variant_and_attack(smoke_run):
    df = load(smoke_run / "results.parquet")
    clf = df[df.threat_model == "classifier"]
    assert set(zip(clf.variant, clf.attack)) == {(v, a) for v in VARIANTS for a in CLASSIFIER_SUITE}
    assert len(clf) == len(VARIANTS) * len(CLASSIFIER_SUITE)
    for threat, attacks in (("full", SMOKE_FULL), ("transfer", SMOKE_TRANSFER)):
        sub = df[df.threat_model == threat]
        assert set(zip(sub.variant, sub.attack)) == {(v, a) for v in VARIANTS for a in attacks}
        assert len(sub) == len(VARIANTS) * len(attacks)
    assert list(df.columns) == SCHEMA.names + ["sweep_id"]
    aa = df.attack == "aa-standard"
    assert (df[aa].n == AA_SUBSET).all() and (df[~aa].n == 200).all()
    assert ((df.accuracy - df.correct / df.n).abs() < 1e-12).all() and (df.hits.str.len() == df.n).all()
    assert (df.hits.str.count("1") == df.correct).all() and (df["first"] == 0).all()
    assert (df[aa]["attack.steps"] == 100).all() and df["attack.settings"].notna().all()


def test_smoke_rows_carry_config_and_provenance(smoke_run):
    df = load(smoke_run / "results.parquet")
    row = df[(df.variant == "kd_at_nt") & (df.attack == "pgd8")].iloc[0]
    assert row["purifier.teachers"] == "at+nt" and row["purifier.kind"] == "student"
    assert row["purifier.beta"] == 0.5 and row["purifier.gamma"] == 0.5
    assert math.isclose(row["ae.eps"], 8 / 255) and row["classifier.arch"] == "resnet8"
    assert row["data.train_size"] == 5085 and row["preset"] == "smoke" and row["run"] == "smoke"
    assert len(row["git_sha"]) >= 7 and row["torch_version"] and row["torchattacks_version"] == "3.5.1"
    assert row["utc"].endswith("+00:00")
    none = df[df.variant == "none"].iloc[0]
    assert none["purifier.kind"] == "none"
    assert none["purifier.beta"] is None or math.isnan(none["purifier.beta"])


def test_smoke_numbers_are_sane(smoke_run):
    df = load(smoke_run / "results.parquet")
    df = df[df.threat_model == "classifier"]
    clean_acc = df[(df.variant == "none") & (df.attack == "clean")].accuracy.item()
    assert clean_acc > 0.3, "the classifier should beat chance (10%) by far"
    assert df["classifier.test_acc"].iloc[0] > 0.3
    for attack in ("pgd8", "bim", "autoattack"):
        assert df[(df.variant == "none") & (df.attack == attack)].accuracy.item() < clean_acc / 2
    for attack, eps in LINF_EPS.items():
        if eps is not None:
            assert (df[df.attack == attack].linf_max <= eps + 1e-6).all(), attack
    assert table1(df).shape == (len(CLASSIFIER_SUITE), len(VARIANTS))


def test_full_white_box_is_never_weaker_than_the_classifier_protocol(smoke_run):
    """Same purifier, same attack: crafting through the purifier must not leave more images
    correct than crafting on the classifier alone. For PGD this holds for every defense;
    through BPDA's identity approximation AutoAttack need not dominate, so it is checked
    where the gradient is exact (on the same first AA_SUBSET images)."""
    df = load(smoke_run / "results.parquet")
    acc = df.set_index(["variant", "attack", "threat_model"])["accuracy"]
    grad = df[df.threat_model == "full"].set_index(["variant", "attack"])["attack.grad"]
    for v in VARIANTS:
        assert acc[(v, "pgd8", "full")] <= acc[(v, "pgd8", "classifier")], v
        if grad[(v, "aa-standard")] == "exact":
            assert acc[(v, "aa-standard", "full")] <= acc[(v, "aa-standard", "classifier")], v
    assert acc[("none", "pgd8", "full")] == acc[("none", "pgd8", "classifier")]  # no purifier: the same attack
    # differentiable purifiers fall much further once the attack sees them
    assert acc[("kd_at_nt", "pgd8", "full")] < acc[("kd_at_nt", "pgd8", "classifier")] / 2


def test_smoke_sanity_checks_pass_and_record_how_gradients_were_taken(smoke_run):
    df = load(smoke_run / "results.parquet")
    assert df["check.eval_mode"].all() and df["check.linf_ok"].all()
    full = df[df.threat_model == "full"].set_index("variant")
    assert full["check.grad_nonzero"].all()
    assert set(full.loc[["jpeg", "soap"], "attack.grad"]) == {"bpda"}
    assert set(full.loc[["kd_at_nt", "nrp", "none"], "attack.grad"]) == {"exact"} and (full["attack.eot"] == 1).all()
    crafted = df[(df.attack != "clean") & (df.threat_model != "full")]
    assert crafted["check.attack_success"].notna().all() and crafted["check.src_correct"].gt(0).all()
    undefended = df[(df.variant == "none") & (df.threat_model == "classifier") & df.attack.isin(["pgd8", "bim"])]
    assert (undefended["check.attack_success"] > 0.9).all() and undefended["checks_ok"].all()
    assert (df["checks_ok"] == (df["check_failures"] == "")).all()


def test_rerun_skips_finished_stages(smoke_run, cifar_subset_dir):
    mtimes = {s: (smoke_run / s / "model.pt").stat().st_mtime_ns for s in STAGES}
    rc = cli.main(["run", "--preset", "smoke", "--data-dir", str(cifar_subset_dir),
                   "--out", str(smoke_run.parent), "--quiet"])
    assert rc == 0
    assert {s: (smoke_run / s / "model.pt").stat().st_mtime_ns for s in STAGES} == mtimes
    last = {e["stage"]: e["status"] for e in _stages(smoke_run)}
    assert all(last[s] == "skipped" for s in STAGES)


def test_same_name_with_another_config_is_refused(smoke_run, cifar_subset_dir, capsys):
    rc = cli.main(["run", "--preset", "smoke", "--data-dir", str(cifar_subset_dir), "--out",
                   str(smoke_run.parent), "--set", "students.beta=0.3", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdp: error:") and "another config" in err and len(err.splitlines()) == 1


def test_crashed_stage_resumes_from_its_last_epoch(tmp_path, cifar_subset_dir, monkeypatch):
    """The NT teacher dies in epoch 3; the re-run skips what finished and redoes only epoch 3."""
    import kdp.stages.common as common
    import kdp.stages.purifier as purifier

    args = ["run", "--preset", "smoke", "--data-dir", str(cifar_subset_dir), "--out", str(tmp_path),
            "--name", "crash", "--quiet", "--set", "data.n_train=256", "--set", "data.n_test=16",
            "--set", "classifier.epochs=1", "--set", "eval.attacks=fgsm", "--set", "eval.adaptive_attacks=",
            "--set", "nt_teacher.epochs=4", "--set", "students.epochs=1", "--set", "baselines=",
            "--set", "eval.threat_models=classifier"]
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
    statuses = [(e["stage"], e["status"]) for e in _stages(run)]
    assert ("teacher_nt", "resumed") in statuses and ("teacher_at", "skipped") in statuses
    assert len(load(run / "results.parquet")) == 6 * 2
