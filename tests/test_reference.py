"""The references a purifier is compared with: the adversarial-training attack, a defense that is its own
classifier attacked once and said under both threat models, e2e_at's inputs, and the report's comparison
with `at_classifier` (paired bootstrap marks and the stated budgets)."""
import dataclasses

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.attacks import madry_pgd
from kdp.baselines.at_classifier import AT_CLASSIFIER, ATClassifier, ATClassifierConfig
from kdp.baselines.e2e_at import E2EATConfig
from kdp.checkpoint import save_checkpoint
from kdp.compare import budget_line, reference_markdown
from kdp.config import EvalConfig, Runtime
from kdp.graph import pipeline_graph
from kdp.indicators import conclude
from kdp.models import CifarResNet, Purified, freeze
from kdp.pipeline_config import PipelineConfig
from kdp.stages.evaluate import Context, evaluate, evaluate_models

RT = Runtime(device="cpu", progress=False)
QUIET = lambda *_: None  # noqa: E731


def test_madry_pgd_stays_in_the_ball_and_raises_the_loss(tiny_data):
    torch.manual_seed(0)
    model = freeze(CifarResNet(depth=8, width=4))
    x, y = tiny_data.test_x[:16].float() / 255, tiny_data.test_y[:16]
    x_adv = madry_pgd(model, x, y, 8 / 255, 2 / 255, 5, torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6 and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    again = madry_pgd(model, x, y, 8 / 255, 2 / 255, 5, torch.Generator().manual_seed(0))
    assert torch.equal(x_adv, again)  # the random start is the generator's


def test_its_own_classifier_is_attacked_once_and_said_under_both_threat_models(tmp_path, tiny_data):
    """at_classifier's `full` attack is the `classifier` one on the same model: copied, marked, equal to
    running it, and its `full` worst case counts the `classifier` suite's attacks too."""
    torch.manual_seed(0)
    defense = ATClassifier(arch="resnet8", width=4).eval()
    cfg = ATClassifierConfig(arch="resnet8", width=4)
    at = save_checkpoint(tmp_path / "at", defense, AT_CLASSIFIER.spec(cfg), {})
    clf = save_checkpoint(tmp_path / "clf", CifarResNet(depth=8, width=4).eval(),
                          {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}, {})
    ev = EvalConfig(attacks=("pgd8", "fgsm"), adaptive_attacks=("pgd8",), threat_models=("classifier", "full"),
                    batch_size=16, eps_curve=(255,), indicator_subset=16)
    rows = evaluate(ev, clf, {"at_classifier": at}, tiny_data, RT, 0, 32, log=QUIET)
    by = {(r["attack"], r["threat_model"]): r for r in rows}
    full, same = by[("pgd8", "full")], by[("pgd8", "classifier")]
    assert full["attack.same_as"] == "classifier" and full["hits"] == same["hits"] and full["checks_ok"]
    assert same["check.attack_ok"] is None  # its source resists attacks by design: no "attack must fool half"
    assert by[("pgd20-eps255", "full")]["attack.same_as"] is None  # not in the classifier suite: run
    # running it under `full` (the identity and the same network, not marked) gives the same images
    ctx = Context(ev, tiny_data.test_x[:32].float() / 255, tiny_data.test_y[:32], torch.device("cpu"), 0)
    net = freeze(defense.net)
    (ran,) = [r for r in evaluate_models(ctx, {"plain": Purified(nn.Identity(), net)}, ("pgd8",), ("full",), None,
                                         QUIET)]
    assert ran["hits"] == full["hits"] and ran["attack.same_as"] is None
    worst = {r["threat_model"]: r for r in conclude(rows, {t: ev.suite(t) for t in ev.threat_models}, QUIET)
             if r["attack"] == "worst-case"}
    assert "fgsm" in worst["full"]["attack.settings"] and worst["full"]["correct"] <= worst["classifier"]["correct"]


def test_e2e_at_waits_for_the_teachers_only_when_it_distils_from_them():
    def needs(e2e):
        cfg = PipelineConfig(e2e_at=e2e)
        return next(s for s in pipeline_graph(cfg) if s.name == "baseline_e2e_at").needs

    assert needs(E2EATConfig()) == ("classifier",)
    assert needs(E2EATConfig(gamma=0.5, teachers=("at",))) == ("classifier", "teacher_at")
    with pytest.raises(ValueError, match="teacher"):
        E2EATConfig(teachers=("xx",))


def _rows(run: str, variant: str, clean: str, worst: dict[str, str]) -> list[dict]:
    """One replicate's clean and worst-case rows of a variant, with the configs budget_line reads."""
    config = {"at_classifier.epochs": 15, "at_classifier.steps": 7, "at_classifier.arch": "resnet8",
              "classifier.epochs": 15, "ae.steps": 7, "at_teacher.epochs": 3, "nt_teacher.epochs": 3,
              "purifier.epochs": 3 if variant.startswith("kd_") else None}
    cells = [("classifier", "clean", clean)] + [(t, "worst-case", h) for t, h in worst.items()]
    return [{"run": run, "variant": variant, "threat_model": t, "attack": a, "n": len(h), "correct": h.count("1"),
             "agree": h.count("1"), "hits": h, **config} for t, a, h in cells]


def test_the_report_says_which_defense_beats_adversarial_training_beyond_noise():
    ones, zeros, half = "1" * 60, "0" * 60, "10" * 30
    rows = []
    for run in ("r-seed0", "r-seed1"):
        rows += _rows(run, "at_classifier", half, {"classifier": half, "full": half})
        rows += _rows(run, "kd_at_nt", ones, {"classifier": ones, "full": zeros})  # clean and classifier ▲, full ▼
        rows += _rows(run, "e2e_at", half, {"classifier": half, "full": half[::-1][:-1] + "1"})  # ≈
    text = reference_markdown(pd.DataFrame(rows))
    line = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert line["student KD←AT+NT"].count("▲") == 2 and line["student KD←AT+NT"].count("▼") == 1
    assert line["E2E-AT CAE"].count("≈") == 3 and "▲" not in line["AT classifier"]
    assert "15 epochs × (PGD-7 + 1 update) = 120 passes" in text and "15 epochs + 7 PGD steps" in text
    assert "`at_classifier` rows" in reference_markdown(pd.DataFrame(rows).query("variant != 'at_classifier'"))


def test_budget_line_is_absent_without_an_at_classifier_config():
    df = pd.DataFrame(_rows("r", "kd_at_nt", "1", {"full": "1"})).drop(columns=["at_classifier.epochs"])
    assert budget_line(df) is None


def test_at_classifier_config_validates_its_attack():
    with pytest.raises(ValueError, match="steps"):
        ATClassifierConfig(steps=0)
    assert dataclasses.replace(ATClassifierConfig(epochs=2, steps=3)).passes == 8


def test_both_references_train_through_ddp(tmp_path, tiny_data):
    """Data-parallel like the teachers: the step trains the DDP-wrapped model while its attack queries
    the bare one (one gloo rank here; Ray Train wraps the same way)."""
    import math

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kdp.baselines import BASELINES
    from kdp.stages.common import train_recipe

    clf = save_checkpoint(tmp_path / "clf", CifarResNet(depth=8, width=4).eval(),
                          {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}, {})
    configs = {"at_classifier": ATClassifierConfig(arch="resnet8", width=4, epochs=1, batch_size=64, steps=1),
               "e2e_at": E2EATConfig(depth=2, width=4, epochs=1, batch_size=64, steps=1)}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for name, cfg in configs.items():
            assert BASELINES[name].parallel
            recipe = BASELINES[name].recipe(cfg, {"classifier": clf}, tiny_data, torch.device("cpu"), RT)
            before = [p.detach().clone() for p in recipe.model.parameters()]
            (epoch,) = train_recipe(cfg, recipe, DDP(recipe.model), RT, name)
            assert math.isfinite(epoch["loss"])
            assert any(not torch.equal(a, b) for a, b in zip(before, recipe.model.parameters()))
    finally:
        dist.destroy_process_group()
