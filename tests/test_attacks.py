"""kdp.attacks: the paper's suite against a tiny trained ResNet, budgets, errors, and the
position-seeded batching that makes AEs independent of sharding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdp.attacks import ATTACKS, PAPER_SUITE, attack_batches, build_attack, describe, linf_budget
from kdp.data import to_float
from kdp.models import CifarResNet, freeze
from kdp.train import epoch_batches, predict, train_epoch

N_ATTACK = 32
N_AUTOATTACK = 4


@pytest.fixture(scope="module")
def trained(tiny_data):
    """ResNet-8 (width 8) fitted for 12 epochs to the 256 tiny training images, then frozen."""
    torch.manual_seed(0)
    model = CifarResNet(depth=8, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = to_float(tiny_data.train_x), tiny_data.train_y
    for epoch in range(12):
        train_epoch(model, opt, epoch_batches(len(x), 32, 0, epoch),
                    lambda idx: {"loss": F.cross_entropy(model(x[idx]), y[idx])})
    freeze(model)
    return model, x, y


def accuracy(model, x, y) -> float:
    return (predict(model, x, torch.device("cpu")) == y).float().mean().item()


def craft(name, model, x, y, **overrides):
    attack = build_attack(name, model, **overrides)
    return torch.cat(list(attack_batches(attack, x, y, batch_size=16, seed=0)))


def test_classifier_learned_something(trained):
    model, x, y = trained
    assert accuracy(model, x, y) > 0.3  # chance is 0.1
    assert accuracy(model, x[:N_ATTACK], y[:N_ATTACK]) > 0.3


def test_suite_and_budgets():
    assert set(PAPER_SUITE) == {"pgd8", "pgd16", "fgsm", "bim", "cw", "autoattack"}
    assert [n for n, a in ATTACKS.items() if a.subset] == ["aa-standard"]
    assert all(a.label and a.name == n for n, a in ATTACKS.items())
    assert linf_budget("pgd8") == pytest.approx(8 / 255)
    assert linf_budget("pgd16") == pytest.approx(16 / 255)
    assert linf_budget("autoattack") == pytest.approx(8 / 255)
    assert linf_budget("cw") is None
    assert linf_budget("pgd8", eps=2 / 255) == pytest.approx(2 / 255)


# every declared attack (the costly per-image ones, aa-standard, in their own test below)
@pytest.mark.parametrize("name", [n for n, a in ATTACKS.items() if not a.subset])
def test_attack_valid_and_effective(trained, name):
    model, x_all, y_all = trained
    n = N_AUTOATTACK if name == "autoattack" else N_ATTACK
    x, y = x_all[:n], y_all[:n]
    x_adv = craft(name, model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert bool(torch.isfinite(x_adv).all())
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    linf = (x_adv - x).abs().amax().item()
    eps = linf_budget(name)
    if eps is not None:
        assert linf <= eps + 1e-6
        assert linf >= 0.5 * eps  # it did move the images
    else:
        assert linf > 0
    clean, adv = accuracy(model, x, y), accuracy(model, x_adv, y)
    assert adv <= clean
    if name in ("pgd8", "bim", "autoattack"):
        assert adv < clean
    if name == "pgd8":
        assert adv <= 0.5 * clean


def test_aa_standard_has_the_original_strengths(trained):
    """Croce & Hein (2020) / RobustBench: APGD-CE 100, APGD-T 9 x 100, FAB-T 9 x 100, Square 5000."""
    model = trained[0]
    pieces = build_attack("aa-standard", model).attacks
    assert [type(a).__name__ for a in pieces] == ["APGD", "APGDT", "FAB", "Square"]
    apgd, apgdt, fab, square = pieces
    assert (apgd.loss, apgd.steps, apgd.n_restarts, apgd.eps) == ("ce", 100, 1, pytest.approx(8 / 255))
    assert (apgdt.steps, apgdt.n_target_classes, apgdt.n_restarts) == (100, 9, 1)
    assert (fab.steps, fab.multi_targeted, fab.n_target_classes, fab.n_restarts) == (100, True, 9, 1)
    assert (square.n_queries, square.n_restarts, square.rescale_schedule) == (5000, 1, False)  # the original's
    assert all(a.model is model and a.norm == "Linf" for a in pieces)
    # each piece's settings that differ from torchattacks' defaults, in brackets
    assert describe(build_attack("aa-standard", model)) == {
        "attack.settings": "APGD-CE 100 steps x 1 restart(s) [steps=100]; "
                           "APGD-T 9 targets x 100 steps x 1 restart(s) [steps=100]; "
                           "FAB-T 9 targets x 100 steps x 1 restart(s) [multi_targeted=True, steps=100]; "
                           "Square 5000 queries x 1 restart(s) [rescale_schedule=False]",
        "attack.steps": 100, "attack.restarts": 1}
    ten = describe(build_attack("autoattack", model))
    assert ten["attack.steps"] == 10 and "APGD-T 9 targets x 10 steps" in ten["attack.settings"]
    assert describe(build_attack("pgd100", model))["attack.steps"] == 100


@pytest.mark.slow
def test_aa_standard_at_most_the_10_step_autoattack(trained):
    """At eps = 1/255 the tiny model keeps some accuracy, so the attacks' strength shows: the
    standard AutoAttack leaves no more images correct than the 10-step one."""
    model, x_all, y_all = trained
    x, y = x_all[:N_AUTOATTACK], y_all[:N_AUTOATTACK]
    ten = accuracy(model, craft("autoattack", model, x, y, eps=1 / 255), y)
    standard = accuracy(model, craft("aa-standard", model, x, y, eps=1 / 255), y)
    assert 0 < ten < accuracy(model, x, y)  # some robustness at this budget, and AA does bite
    assert standard <= ten


def test_unknown_attack_and_negative_budget(trained):
    model = trained[0]
    with pytest.raises(ValueError) as e:
        build_attack("pgd99", model)
    assert "'pgd99'" in str(e.value)
    for valid in PAPER_SUITE:
        assert valid in str(e.value)
    with pytest.raises(ValueError, match="pgd8"):
        linf_budget("deepfool")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        build_attack("pgd8", model, eps=-1 / 255)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        build_attack("bim", model, alpha=-0.1)


def test_eps_override(trained):
    model, x, y = trained
    x, y = x[:N_ATTACK], y[:N_ATTACK]
    x_adv = craft("pgd8", model, x, y, eps=2 / 255)
    linf = (x_adv - x).abs().amax().item()
    assert linf <= 2 / 255 + 1e-6
    assert linf >= 2 / 255 - 1e-6  # PGD reaches the (smaller) boundary


def test_attack_batches_deterministic_under_sharding(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    attack = build_attack("pgd8", model)  # random start: the seeding matters

    def run(lo, hi, start, seed=0):
        return torch.cat(list(attack_batches(attack, x[lo:hi], y[lo:hi], 16, seed, start=start)))

    whole = run(0, 32, 0)
    assert torch.equal(whole, torch.cat([run(0, 16, 0), run(16, 32, 16)]))
    assert torch.equal(whole, run(0, 32, 0))
    # the seed and the global position both matter
    assert not torch.equal(whole, run(0, 32, 0, seed=1))
    assert not torch.equal(whole[16:], run(16, 32, 0))


def test_attack_batches_leaves_global_rng_alone(trained):
    model, x, y = trained
    attack = build_attack("pgd8", model, steps=1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(attack_batches(attack, x[:8], y[:8], 4, seed=0))
    assert torch.equal(torch.rand(3), expected)
