"""`kdp export`: a run's defense as one TorchScript model and a RobustBench card, checked by the
field's own code. A tiny run directory (classifier, one student, the JPEG and a randomized NRP
baseline, kdp's own clean and full-threat aa-standard rows) is exported with `--check`
(kdp.robustbench_check): the model is loaded with torch alone in a subprocess that imports no kdp,
and scored there with RobustBench's `clean_accuracy` and the original AutoAttack
(`version='standard'`, eps 8/255, kdp's seed), on the same test images as kdp's rows: the same
images must be correct, clean and under attack."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import torch_threads
from kdp import cli
from kdp import robustbench_check as rbc
from kdp.baselines import BASELINES
from kdp.baselines.nrp import NRPConfig
from kdp.checkpoint import save_checkpoint
from kdp.files import write_json
from kdp.config import DataConfig, EvalConfig, Runtime, StudentConfig
from kdp.configio import flatten
from kdp.data import load_cifar, to_float
from kdp.errors import ConfigError, DataError
from kdp.export import CARD_KEYS, export
from kdp.indicators import conclude
from kdp.models import ConvAutoencoder, CifarResNet, Purified
from kdp.pipeline_config import PipelineConfig
from kdp.provenance import provenance
from kdp.results import load, make_rows, write_results
from kdp.stages.classifier import classifier_spec
from kdp.stages.evaluate import evaluate
from kdp.stages.purifier import purifier_spec

N_TEST = 8  # test images kdp and RobustBench both score
VARIANT = "kd_at_nt"

def tiny_config(data_dir: Path, n_train: int) -> PipelineConfig:
    ev = EvalConfig(attacks=(), adaptive_attacks=("aa-standard",), threat_models=("classifier", "full"),
                    eps_curve=(), aa_subset=None, batch_size=N_TEST)
    return PipelineConfig(name="exp", preset="test", data=DataConfig(str(data_dir), n_train, N_TEST),
                          students=(StudentConfig(depth=2, width=8),), baselines=("jpeg", "nrp"),
                          nrp=NRPConfig(width=4, blocks=0, dynamic_std=0.1), eval=ev,
                          classifier=dataclasses.replace(PipelineConfig().classifier, arch="resnet8", width=8))


def make_run(root: Path, data_dir: Path, n_train: int = 384, bias: float = 0.0) -> Path:
    """A finished run's directory as `kdp run` lays it out: config.json, the classifier, the student
    kd_at_nt (a CAE trained with the classifier for a few seconds), the JPEG and a randomized NRP
    baseline, and results.parquet with kdp's clean and full-threat aa-standard rows of the student.
    On one thread (the test's counts are those of one thread's weights). With n_train=384, 3 of the
    8 test images are classified correctly and AutoAttack's first piece fools all 3 (seconds); `bias`
    > 0 adds that much to the classifier's frog logit: with n_train=512 and bias 1, 4 are correct
    and 3 survive every AutoAttack piece (the slow test, a minute: Square's 5000 queries)."""
    with torch_threads(1):
        return _make_run(root, data_dir, n_train, bias)


def _make_run(root: Path, data_dir: Path, n_train: int, bias: float) -> Path:
    cfg = tiny_config(data_dir, n_train)
    run = root / cfg.name
    data = load_cifar(data_dir, n_train, N_TEST)
    torch.manual_seed(0)
    clf, cae = CifarResNet(depth=8, width=8), ConvAutoencoder(depth=2, width=8)
    opt = torch.optim.Adam([*clf.parameters(), *cae.parameters()], 3e-3)
    x, y = to_float(data.train_x), data.train_y
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(clf(cae(x[i:i + 64])), y[i:i + 64]).backward()
            opt.step()
    with torch.no_grad():
        clf.fc.bias[6] += bias
    write_json(run / "config.json", json.loads(json.dumps(dataclasses.asdict(cfg))))
    save_checkpoint(run / "classifier", clf, classifier_spec(cfg.classifier), flatten(cfg.classifier))
    student = cfg.students[0]
    save_checkpoint(run / f"student_{student.variant}", cae, purifier_spec(student), flatten(student))
    for b in cfg.baselines:
        d, bcfg = BASELINES[b], getattr(cfg, b)
        save_checkpoint(run / f"baseline_{b}", d.purifier(**d.kwargs(bcfg)), d.spec(bcfg), flatten(bcfg))
    rt = Runtime(device="cpu", progress=False)
    rows = evaluate(cfg.eval, run / "classifier", {student.variant: run / f"student_{student.variant}"}, data, rt,
                    log=lambda *_: None)
    rows = conclude(rows, {t: cfg.eval.suite(t) for t in cfg.eval.threat_models}, lambda *_: None)
    extra = {"data.source": data.source, "data.train_size": len(data.train_y), **provenance(rt)}
    write_results(make_rows(cfg, {student.variant: student}, rows, extra), run / "results.parquet")
    return run


def kdp_row(run: Path, attack: str, threat: str) -> dict:
    df = load(run / "results.parquet")
    (row,) = df[(df.variant == VARIANT) & (df.attack == attack) & (df.threat_model == threat)].to_dict("records")
    return row


def assert_same_numbers(run: Path, out: Path, capsys) -> dict:
    """`kdp export --check`: RobustBench's numbers on the exported model equal kdp's rows image by
    image, and the card's; the table says so, and <name>.check.json holds the check's result."""
    with torch_threads(1):  # as kdp's rows were made (make_run): the subprocess gets this process's threads
        assert cli.main(["export", str(run), VARIANT, "--out", str(out), "--check"]) == 0
    model, card, checked = (out / f"kdp_exp_{VARIANT}{suffix}" for suffix in (".pt", ".json", ".check.json"))
    assert sorted(p.name for p in out.iterdir()) == sorted([model.name, card.name, checked.name])  # no temp file
    got = json.loads(checked.read_text())
    rb, clean, aa = got["robustbench"], kdp_row(run, "clean", "classifier"), kdp_row(run, "aa-standard", "full")
    assert got["kdp_modules"] == []  # RobustBench's side ran without kdp
    assert got["flags"] == []  # AutoAttack's own checks (randomized, dynamic, zero gradients, ...) flag nothing
    assert got["card_unknown_keys"] == []  # every key is a field of RobustBench's model_info schema
    assert got["linf"] <= 8 / 255 + 1e-6 and got["settings"] == {"eps": 8 / 255, "seed": 0, "batch_size": N_TEST,
                                                                 "threads": 1}
    assert got["images"] == {"data_dir": str(json.loads((run / "config.json").read_text())["data"]["data_dir"]),
                             "first": 0, "n": N_TEST}
    assert rb["clean"]["hits"] == clean["hits"] and clean["n"] == N_TEST
    assert rb["clean"]["correct"] == clean["correct"] == clean["hits"].count("1")
    assert rb["autoattack"]["hits"] == aa["hits"] and rb["autoattack"]["correct"] == aa["correct"] and aa["n"] == N_TEST
    assert got["same"] is True and got["kdp"]["autoattack"]["hits"] == aa["hits"]
    info = json.loads(card.read_text())
    pct = {k: f"{100 * rb[k]['correct'] / N_TEST:.2f}" for k in ("clean", "autoattack")}
    assert info["clean_acc"] == pct["clean"] and info["autoattack_acc"] == pct["autoattack"]
    assert got["card_values"] == {"clean_acc": info["clean_acc"], "autoattack_acc": info["autoattack_acc"]}
    printed = capsys.readouterr().out
    for label, row in (("clean", clean), ("AutoAttack", aa)):
        n = f"{row['correct']}/{N_TEST}"
        assert re.search(rf"^{label} +{n} +{n} +yes$", printed, re.M), printed
    assert "AutoAttack's warnings: none" in printed and f"wrote {checked}" in printed
    return {"card": info, "clean_row": clean, "aa_row": aa}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar_subset_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("export_run"), cifar_subset_dir)


def test_robustbench_gets_kdps_numbers(run_dir, tmp_path, capsys):
    """The exported model, loaded with torch alone, gets kdp's clean and robust counts image by
    image under RobustBench's clean_accuracy and the original AutoAttack (`kdp export --check`);
    the card says them, with exactly RobustBench's model_info keys and formats."""
    got = assert_same_numbers(run_dir, tmp_path / "out", capsys)
    assert got["clean_row"]["correct"] > 0  # a classifier that is right on some images, so the counts say something
    card = got["card"]
    assert tuple(card) == CARD_KEYS
    assert card["eps"] == "8/255" and card["dataset"] == "cifar10" and card["number_forward_passes"] == 1
    assert card["additional_data"] is False and card["reported"] == card["autoattack_acc"]
    assert card["architecture"] == "CAE(depth=2, head=literal, width=8) + ResNet-8 (width 8)"
    assert f"{N_TEST} CIFAR-10 test images" in card["footnote"] and "not RobustBench's" in card["footnote"]
    assert "'exp'" in card["footnote"] and "'test'" in card["footnote"]


@pytest.mark.parametrize("variant, why", [("jpeg", "not differentiable"), ("nrp", "randomized")])
def test_excluded_defenses_refused_in_one_line(run_dir, tmp_path, variant, why):
    """BPDA (JPEG) and randomized (NRP with dynamic inference) defenses are refused, quoting
    RobustBench's rule, before anything is written."""
    with pytest.raises(ConfigError) as e:
        export(run_dir, variant, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and why in msg and "fully deterministic forward pass" in msg
    assert "non-zero gradients wrt the inputs" in msg and variant in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_variant_one_line(run_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown variant 'kd_zz' .*valid: none, at_teacher, .*kd_at_nt, jpeg, nrp"):
        export(run_dir, "kd_zz", tmp_path)
    assert cli.main(["export", str(run_dir), "kd_zz", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdp: error: unknown variant 'kd_zz'") and "\n" not in err
    assert not (tmp_path / "o").exists()
    assert cli.main(["export", "s3://bucket/runs/exp", VARIANT, "--out", str(tmp_path / "o")]) == 2
    assert "takes a local path" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_missing_checkpoint_and_missing_row(run_dir, tmp_path):
    """A variant whose stage never ran, and a run without the full-threat aa-standard row: one
    line each, the latter naming the --set that would add the row."""
    with pytest.raises(FileNotFoundError, match=r"teacher_at.*variants of this run with checkpoints: none, kd_at_nt"):
        export(run_dir, "at_teacher", tmp_path)
    run = tmp_path / "exp"
    shutil.copytree(run_dir, run)
    table = pq.read_table(run / "results.parquet")
    pq.write_table(table.filter(pc.equal(table["attack"], "clean")), run / "results.parquet")
    with pytest.raises(DataError) as e:
        export(run, VARIANT, tmp_path / "out")
    assert "\n" not in str(e.value) and "--set eval.adaptive_attacks=aa-standard" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_failed_check_publishes_nothing(run_dir, tmp_path, monkeypatch):
    """A saved model that does not give the defense's logits is never published."""
    import kdp.export as export_module

    save = export_module.save_traced
    monkeypatch.setattr(export_module, "save_traced", lambda d, p: save(Purified(nn.Identity(), d.classifier), p))
    with pytest.raises(RuntimeError, match="differs from the defense"):
        export(run_dir, VARIANT, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "RUN_DIR" in out and "VARIANT" in out and "--out DIR" in out and "RobustBench" in out
    assert "--check" in out and "exit status 1 when they differ" in out and "pip install -e '.[robustbench]'" in out



def test_check_mismatch_exits_1(run_dir, tmp_path, monkeypatch, capsys, cifar_subset_dir):
    """`--check` whose RobustBench side disagrees on one image (faked: no subprocess): the table
    says which side, <name>.check.json records it, exit status 1. The fake also sees what the
    script would: the first N_TEST test images as floats, the run's seed and batch size."""
    clean, aa = kdp_row(run_dir, "clean", "classifier"), kdp_row(run_dir, "aa-standard", "full")
    flipped = str(1 - int(clean["hits"][0])) + clean["hits"][1:]
    seen = {}

    def fake(args: dict) -> dict:
        seen.update(args, images=torch.load(args["data"], weights_only=True))
        return {"clean": {"correct": flipped.count("1"), "n": N_TEST, "hits": flipped},
                "autoattack": {"correct": aa["correct"], "n": N_TEST, "hits": aa["hits"]},
                "flags": ["a warning"], "linf": 0.0, "card_unknown_keys": [], "versions": {}, "kdp_modules": []}

    monkeypatch.setattr(rbc, "run_script", fake)
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), VARIANT, "--out", str(out), "--check"]) == 1
    printed = capsys.readouterr().out
    assert re.search(rf"^clean +{clean['correct']}/{N_TEST} +{flipped.count('1')}/{N_TEST} +no$", printed, re.M)
    assert re.search(rf"^AutoAttack +{aa['correct']}/{N_TEST} +{aa['correct']}/{N_TEST} +yes$", printed, re.M)
    assert "AutoAttack's warnings: a warning" in printed
    got = json.loads((out / f"kdp_exp_{VARIANT}.check.json").read_text())
    assert got["same"] is False and got["robustbench"]["clean"]["hits"] == flipped
    assert got["kdp"]["clean"] == {"correct": clean["correct"], "n": N_TEST, "hits": clean["hits"]}
    data = load_cifar(cifar_subset_dir, 0, N_TEST)
    assert torch.equal(seen["images"]["x"], to_float(data.test_x)) and torch.equal(seen["images"]["y"], data.test_y)
    assert (seen["seed"], seen["batch_size"], seen["eps"]) == (0, N_TEST, 8 / 255)


def test_check_without_robustbench_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """Without the robustbench extra, `--check` is one line naming it, before anything is written;
    the same line when the subprocess cannot import it (its script returns MISSING)."""
    real = rbc.find_spec
    monkeypatch.setattr(rbc, "find_spec", lambda name: None if name == "pyautoattack" else real(name))
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), VARIANT, "--out", str(out), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdp: error: --check") and "\n" not in err and not out.exists()
    assert "pyautoattack is not installed" in err and "pip install -e '.[robustbench]'" in err
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # `import pyautoattack` fails, as where it is missing

    def in_process(cmd, **_):  # the script's main here, where pyautoattack does not import
        return subprocess.CompletedProcess(cmd, rbc.main(cmd[-1:]), "", "")

    monkeypatch.setattr(rbc, "subprocess", SimpleNamespace(run=in_process))
    with pytest.raises(ConfigError, match=r"pyautoattack is not installed; .*pip install -e '\.\[robustbench\]'"):
        rbc.run_script({"out": str(tmp_path / "result.json")})
    assert json.loads((tmp_path / "result.json").read_text()) == {"missing": "pyautoattack"}

@pytest.mark.slow
def test_robustbench_gets_kdps_numbers_with_survivors(tmp_path_factory, cifar_subset_dir, tmp_path, capsys):
    """As above, on a defense where some images survive every AutoAttack piece (APGD-CE, APGD-T,
    FAB-T, Square 5000 queries) and others fall: still the same images, kdp's and RobustBench's."""
    run = make_run(tmp_path_factory.mktemp("export_bias"), cifar_subset_dir, n_train=512, bias=1.0)
    got = assert_same_numbers(run, tmp_path / "out", capsys)
    assert 0 < got["aa_row"]["correct"] < got["clean_row"]["correct"]
