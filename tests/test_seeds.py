"""Replicates (--seeds): one run per seed sharing the classifier and the training AEs, the
report's intervals over them, and the evaluation AE cache on a re-run."""
from pathlib import Path

import pytest

from conftest import tiny_argv
from kdp import cli
from kdp.events import read_events
from kdp.report import table1_markdown
from kdp.results import load

SMALL = ["data.n_train=256", "data.n_test=32", "classifier.epochs=1", "at_teacher.epochs=1", "nt_teacher.epochs=1",
         "baselines=", "eval.threat_models=classifier", "eval.attacks=fgsm+pgd8"]


def _argv(data_dir, out: Path, *extra) -> list[str]:
    return tiny_argv(data_dir, out, *(a for s in SMALL for a in ("--set", s)), *extra)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, cifar_subset_dir):
    out = tmp_path_factory.mktemp("seeds")
    assert cli.main(_argv(cifar_subset_dir, out, "--name", "tiny", "--seeds", "0,1")) == 0
    return out


def test_one_run_per_seed_sharing_classifier_and_aes(seeded):
    assert sorted(p.name for p in seeded.iterdir() if (p / "config.json").exists()) == ["tiny-seed0", "tiny-seed1"]
    made = {r: [e["stage"] for e in read_events(seeded / r) if e["status"] == "started"]
            for r in ("tiny-seed0", "tiny-seed1")}
    assert "classifier" in made["tiny-seed0"] and "classifier" not in made["tiny-seed1"]
    assert "teacher_at" in made["tiny-seed1"]  # the teachers depend on the seed
    assert len(list((seeded / "cache" / "aes").glob("*/x_adv.npy"))) == 1  # one classifier: one set of AEs
    df = load(seeded)
    assert sorted(df["seed"].unique()) == [0, 1]
    assert set(df.groupby("run")["at_teacher.seed"].first()) == {0, 1}
    assert df.groupby("run")["classifier.test_acc"].first().nunique() == 1  # the same classifier
    assert (df["hits"].str.len() == df["n"]).all()


def test_report_intervals_pool_the_seeds(seeded):
    md = table1_markdown(load(seeded))
    assert "pooled over 2 run(s)" in md and " ± " in md


def test_a_rescored_rerun_reuses_the_evaluation_aes(seeded, cifar_subset_dir):
    before = load(seeded / "tiny-seed0" / "results.parquet")
    assert not before["attack.cached"].any()
    assert cli.main(_argv(cifar_subset_dir, seeded, "--name", "tiny", "--seeds", "0", "--rescore")) == 0
    after = load(seeded / "tiny-seed0" / "results.parquet")
    crafted = after["attack"] != "clean"
    assert after.loc[crafted, "attack.cached"].all() and not after.loc[~crafted, "attack.cached"].any()
    key = ["variant", "attack", "threat_model"]
    assert (after.sort_values(key)["hits"].tolist() == before.sort_values(key)["hits"].tolist())


def test_a_replicate_names_what_it_reused_and_analyze_finds_it(seeded):
    from kdp.analyze import analyze
    from kdp.files import read_json

    given = read_json(seeded / "tiny-seed1" / "given.json")
    assert given["classifier"] == str(seeded.resolve() / "tiny-seed0" / "classifier")
    assert not (seeded / "tiny-seed0" / "given.json").exists()
    records = analyze(seeded / "tiny-seed1", n=16)
    assert sorted(r["variant"] for r in records) == ["kd_at", "kd_at_nt", "kd_nt"]
    assert all(r["n"] == 16 and -1 <= r["cos_x_nt"] <= 1 for r in records)
