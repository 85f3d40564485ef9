"""Indicators of attack failure: each fires on a planted defect and stays quiet on the undefended
classifier and an honest differentiable purifier (the tiny run's); the cross-row ones and the
worst-case rows on rows whose per-image outcomes are known."""
import pytest
import torch
import torch.nn as nn

from kdp.attacks import ATTACKS, EPS, Attack, ta
from kdp.checkpoint import load_frozen
from kdp.config import EvalConfig
from kdp.data import to_float
from kdp.indicators import INDICATORS, WORST, conclude, worst_case
from kdp.models import Purified, freeze
from kdp.stages.evaluate import Context, evaluate_models, finalize
from kdp.trace import incomplete

QUIET = lambda *_: None  # noqa: E731
N = 32  # the tiny run's test images


class Detached(nn.Module):
    """Not differentiable (its output is computed off the graph) but claims exact gradients."""

    def forward(self, x):
        return x * 0 + x.detach()  # connected to the graph, so attacks run, but no gradient flows


class Staircase(nn.Module):
    """A gradient that is zero almost everywhere (a coarse quantizer), also claiming exact gradients."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class SecretlyRandom(nn.Module):
    """Randomized, but does not say so (no `randomized`): attacked without EOT."""

    def forward(self, x):
        return (x + 0.1 * torch.randn_like(x)).clamp(0, 1)


def last_point(model, **kw):
    """An attack that finds AEs by PGD, then steps back to the clean image and returns that, its last point."""
    import torchattacks

    class LastPoint(torchattacks.PGD):
        def forward(self, images, labels):
            super().forward(images, labels)
            self.get_logits(images)  # its last iterate: the clean image
            return images.clone().detach()
    return LastPoint(model, eps=EPS, alpha=2 / 255, steps=10, random_start=True, **kw)


def mini_aa(model, **kw):
    import torchattacks

    return torchattacks.MultiAttack([torchattacks.APGD(model, eps=EPS, steps=5, n_restarts=1, seed=0),
                                     torchattacks.Square(model, eps=EPS, n_queries=100, n_restarts=1, seed=0)])


PLANTED = {a.name: a for a in (
    Attack("pgd-1step", "PGD, 1 small step", ta("PGD", eps=EPS, alpha=0.25 / 255, steps=1), EPS, iterates="ce"),
    Attack("last-point", "PGD returning its last point", last_point, EPS, iterates="ce"),
    Attack("mini-aa", "APGD then Square", mini_aa, EPS))}


@pytest.fixture
def planted(monkeypatch):
    for name, a in PLANTED.items():
        monkeypatch.setitem(ATTACKS, name, a)


@pytest.fixture(scope="module")
def models(tiny_run):
    return load_frozen(tiny_run / "classifier"), load_frozen(tiny_run / "teacher_at")


def run(models, tiny_data, purifiers: dict, classifier=(), full=(), curve=()):
    """Concluded rows of `purifiers` (variant -> nn.Module, None: none) on the tiny run's test images."""
    clf = models[0]
    cfg = EvalConfig(attacks=tuple(classifier), adaptive_attacks=tuple(full), transfer_attacks=(),
                     threat_models=("classifier", "full"), batch_size=N, eps_curve=tuple(curve), indicator_subset=16)
    ctx = Context(cfg, to_float(tiny_data.test_x[:N]), tiny_data.test_y[:N], "cpu", 0)
    defenses = {v: Purified(freeze(nn.Identity() if p is None else p), clf) for v, p in purifiers.items()}
    rows = finalize(evaluate_models(ctx, defenses, log=QUIET), cfg, QUIET)
    return {(r["variant"], r["threat_model"], r["attack"]): r
            for r in conclude(rows, {t: cfg.suite(t) for t in cfg.threat_models}, QUIET)}


def fired(row) -> set[str]:
    return {n for n in INDICATORS if row[f"indicator.{n}"]}


def test_quiet_on_the_undefended_classifier_and_an_honest_purifier(models, tiny_data):
    rows = run(models, tiny_data, {"none": None, "at": models[1]}, classifier=("pgd8",), full=("pgd8",),
               curve=(8, 255))
    assert {k: fired(r) for k, r in rows.items() if fired(r)} == {}
    full = rows[("at", "full", "pgd8")]
    assert full["indicator.unavailable_gradients"] is False and full["indicator.unstable_predictions"] is False
    assert full["indicator.unbounded_attack_failure"] is False and full["indicator.silent_success"] is False
    assert rows[("at", "classifier", "clean")]["indicator.silent_success"] is None  # no attack: does not apply


@pytest.mark.parametrize("plant", [Detached(), Staircase()], ids=["not-differentiable", "zero-almost-everywhere"])
def test_unavailable_gradients_fires_on_a_defense_without_gradients(models, tiny_data, plant):
    rows = run(models, tiny_data, {"plant": plant}, full=("pgd8",), curve=(255,))
    assert "unavailable_gradients" in fired(rows[("plant", "full", "pgd8")])
    assert rows[("plant", "full", "pgd8")]["trace.zero_grad"] == N


def test_unstable_predictions_fires_on_a_randomized_defense_declared_deterministic(models, tiny_data):
    rows = run(models, tiny_data, {"plant": SecretlyRandom()}, full=("pgd8",))
    row = rows[("plant", "full", "pgd8")]
    assert "unstable_predictions" in fired(row) and row["attack.eot"] == 1 and row["trace.unstable"] > 0


def test_incomplete_optimization_fires_on_an_attack_stopped_after_one_step(models, tiny_data, planted):
    rows = run(models, tiny_data, {"none": None}, classifier=("pgd-1step",))
    row = rows[("none", "classifier", "pgd-1step")]
    assert "incomplete_optimization" in fired(row) and row["trace.incomplete"] > 0


def test_silent_success_fires_on_an_attack_returning_its_last_point_and_the_best_point_is_scored(
        models, tiny_data, planted):
    rows = run(models, tiny_data, {"none": None}, classifier=("last-point", "pgd8"))
    row, clean = rows[("none", "classifier", "last-point")], rows[("none", "classifier", "clean")]
    assert "silent_success" in fired(row) and row["trace.silent"] > 0
    assert row["correct"] == clean["correct"] - row["trace.silent"]  # its returned points were the clean images


def test_blackbox_beats_whitebox_fires_when_square_fools_what_gradients_could_not(models, tiny_data, planted):
    rows = run(models, tiny_data, {"plant": Detached()}, full=("mini-aa",))
    row = rows[("plant", "full", "mini-aa")]
    assert "blackbox_beats_whitebox" in fired(row) and row["trace.blackbox_only"] > 0


def test_unbounded_attack_failure_fires_when_an_unbounded_pgd_leaves_images_correct(models, tiny_data):
    rows = run(models, tiny_data, {"plant": Staircase()}, full=("pgd8",), curve=(255,))
    unbounded = rows[("plant", "full", "pgd20-eps255")]
    assert unbounded["correct"] > 0 and "unbounded_attack_failure" in fired(rows[("plant", "full", "pgd8")])


def _row(variant, threat, attack, hits, first=0, **kw):
    return {"variant": variant, "threat_model": threat, "attack": attack, "hits": hits, "first": first,
            "n": len(hits), "correct": hits.count("1"), "linf_max": 0.03, **kw}


def test_cross_row_indicators_compare_on_the_images_both_ran_on():
    rows = [_row("v", "classifier", "clean", "11111111"),
            _row("v", "classifier", "pgd8", "11000000"),     # fools more than the full attack below
            _row("v", "full", "pgd100", "11110000"),
            _row("v", "full", "aa-standard", "1110", **{"trace.blackbox_only": 1}),  # first 4 only
            _row("v", "full", "pgd20-eps255", "0000"),
            _row("v", "classifier", "pgd16", "11100000")]   # dominates pgd8 yet leaves more correct
    by = {(r["threat_model"], r["attack"]): r for r in conclude(rows, {"full": ("pgd100", "aa-standard"),
                                                                        "classifier": ("pgd8", "pgd16")}, QUIET)}
    assert fired(by[("full", "pgd100")]) == {"transfer_beats_whitebox"}
    # aa-standard dominates pgd100: on images 0..3 it leaves 3, pgd100 leaves 4: not weaker; Square-only: 1
    assert fired(by[("full", "aa-standard")]) == {"blackbox_beats_whitebox", "transfer_beats_whitebox"}
    assert fired(by[("classifier", "pgd16")]) == {"stronger_attack_weaker"}
    assert by[("full", "pgd100")]["indicator.unbounded_attack_failure"] is False
    assert by[("classifier", "clean")]["indicator.transfer_beats_whitebox"] is None


def test_worst_case_counts_an_image_only_if_it_survives_every_attack_on_shared_images():
    rows = [_row("v", "classifier", "clean", "1111011"), _row("v", "full", "pgd100", "1101011"),
            _row("v", "full", "aa-standard", "011", first=1), _row("v", "full", "pgd20-eps255", "0000000")]
    (w,) = worst_case(rows, {"full": ("pgd100", "aa-standard")})
    assert (w["attack"], w["first"], w["n"], w["hits"], w["correct"]) == (WORST, 1, 3, "001", 1)


def test_incomplete_reads_the_running_best_over_the_last_tenth():
    still_rising = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0], [9.0], [10.0]])
    flat_end = torch.tensor([[0.0], [9.0], [10.0]] + [[10.0]] * 8)
    assert incomplete(torch.cat([still_rising, flat_end], 1)).tolist() == [True, False]
