"""`kdp export`: a run's defense as one TorchScript model and a RobustBench card, checked by the
field's own code. A tiny run directory (classifier, one student, the JPEG and a randomized NRP
baseline, kdp's own clean and full-threat aa-standard rows) is exported; the model is then loaded
with torch alone in a subprocess that imports no kdp, and scored there with RobustBench's
`clean_accuracy` and the original AutoAttack (`version='standard'`, eps 8/255, kdp's seed), on the
same test images as kdp's rows: the same images must be correct, clean and under attack.

RobustBench 1.1.1 from PyPI imports `autoattack` (the GitHub package's name) but depends on
`pyautoattack` (AutoAttack's PyPI release, the same attack pieces under another name and a
keyword-only API), so the subprocess aliases one to the other before importing robustbench
(pyproject.toml, the `robustbench` extra)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import torch_threads
from kdp import cli
from kdp.baselines import BASELINES
from kdp.baselines.nrp import NRPConfig
from kdp.checkpoint import save_checkpoint, write_json
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

# Runs in a fresh interpreter with torch, robustbench and AutoAttack only; prints one JSON line.
ROBUSTBENCH_SIDE = r"""
import json, logging, sys
import torch
torch.set_num_threads(1)  # as kdp's rows were made (make_run)
import pyautoattack, pyautoattack.state
sys.modules.setdefault("autoattack", pyautoattack)  # robustbench 1.1.1 imports the GitHub package's name
sys.modules.setdefault("autoattack.state", pyautoattack.state)
from robustbench.utils import ModelInfo, clean_accuracy
from autoattack import AutoAttack

args = json.loads(sys.argv[1])
flags = []
class Flags(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            flags.append(record.getMessage())
logging.getLogger("auto-attack").addHandler(Flags())
model = torch.jit.load(args["model"], map_location="cpu")
data = torch.load(args["data"], weights_only=True)
x, y = data["x"], data["y"]
clean = clean_accuracy(model, x, y, batch_size=len(x))
adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=args["seed"], device="cpu")
x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=args["batch_size"])
robust = clean_accuracy(model, x_adv, y, batch_size=len(x))
with torch.no_grad():
    bits = lambda images: "".join("1" if h else "0" for h in (model(images).argmax(1) == y).tolist())
    clean_hits, hits = bits(x), bits(x_adv)
card = json.loads(open(args["card"]).read())
ModelInfo(**card)  # every key is a field of RobustBench's model_info schema
print(json.dumps({"clean": clean, "robust": robust, "clean_hits": clean_hits, "hits": hits, "flags": flags,
                  "linf": float((x_adv - x).abs().max()), "fields": sorted(ModelInfo.__dataclass_fields__),
                  "kdp_modules": sorted(m for m in sys.modules if m == "kdp" or m.startswith("kdp."))}))
"""


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
    torch.save({"x": to_float(data.test_x), "y": data.test_y}, root / "test_images.pt")
    return run


def kdp_row(run: Path, attack: str, threat: str) -> dict:
    df = load(run / "results.parquet")
    (row,) = df[(df.variant == VARIANT) & (df.attack == attack) & (df.threat_model == threat)].to_dict("records")
    return row


def robustbench_side(run: Path, model: Path, card: Path, cwd: Path) -> dict:
    """RobustBench's clean_accuracy and the original AutoAttack on the exported model, in a fresh
    interpreter that never imports kdp (isolated mode: no cwd or PYTHONPATH on its path)."""
    cfg = json.loads((run / "config.json").read_text())["eval"]
    args = {"model": str(model), "card": str(card), "data": str(run.parent / "test_images.pt"),
            "seed": cfg["seed"], "batch_size": cfg["batch_size"]}
    out = subprocess.run([sys.executable, "-I", "-W", "ignore", "-c", ROBUSTBENCH_SIDE, json.dumps(args)], cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same_numbers(run: Path, out: Path, tmp: Path) -> dict:
    """Export through the CLI, then RobustBench's numbers on the model equal kdp's rows and the card's."""
    assert cli.main(["export", str(run), VARIANT, "--out", str(out)]) == 0
    model, card = out / f"kdp_exp_{VARIANT}.pt", out / f"kdp_exp_{VARIANT}.json"
    assert sorted(p.name for p in out.iterdir()) == sorted([model.name, card.name])  # no temp file left
    rb = robustbench_side(run, model, card, tmp)
    clean, aa = kdp_row(run, "clean", "classifier"), kdp_row(run, "aa-standard", "full")
    assert rb["kdp_modules"] == []
    assert rb["flags"] == []  # AutoAttack's own checks (randomized, dynamic, zero gradients, ...) flag nothing
    assert rb["linf"] <= 8 / 255 + 1e-6
    assert rb["clean_hits"] == clean["hits"] and clean["n"] == N_TEST
    assert round(rb["clean"] * N_TEST) == clean["correct"] == clean["hits"].count("1")
    assert rb["hits"] == aa["hits"] and round(rb["robust"] * N_TEST) == aa["correct"] and aa["n"] == N_TEST
    info = json.loads(card.read_text())
    assert info["clean_acc"] == f"{100 * rb['clean']:.2f}" and info["autoattack_acc"] == f"{100 * rb['robust']:.2f}"
    return {**rb, "card": info, "clean_row": clean, "aa_row": aa}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar_subset_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("export_run"), cifar_subset_dir)


def test_robustbench_gets_kdps_numbers(run_dir, tmp_path):
    """The exported model, loaded with torch alone, gets kdp's clean and robust counts image by
    image under RobustBench's clean_accuracy and the original AutoAttack; the card says them, with
    exactly RobustBench's model_info keys and formats."""
    got = assert_same_numbers(run_dir, tmp_path / "out", tmp_path)
    assert got["clean_row"]["correct"] > 0  # a classifier that is right on some images, so the counts say something
    card = got["card"]
    assert tuple(card) == CARD_KEYS and set(card) <= set(got["fields"])
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
    out = capsys.readouterr().out
    assert "RUN_DIR" in out and "VARIANT" in out and "--out DIR" in out and "RobustBench" in out


@pytest.mark.slow
def test_robustbench_gets_kdps_numbers_with_survivors(tmp_path_factory, cifar_subset_dir, tmp_path):
    """As above, on a defense where some images survive every AutoAttack piece (APGD-CE, APGD-T,
    FAB-T, Square 5000 queries) and others fall: still the same images, kdp's and RobustBench's."""
    run = make_run(tmp_path_factory.mktemp("export_bias"), cifar_subset_dir, n_train=512, bias=1.0)
    got = assert_same_numbers(run, tmp_path / "out", tmp_path)
    assert 0 < got["aa_row"]["correct"] < got["clean_row"]["correct"]
