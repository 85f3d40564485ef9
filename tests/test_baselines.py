"""The baseline purifiers (kdp.baselines), every registered one picked up by the parametrized
tests: each is made through its stage (its recipe, or its checkpoint written as is), reloads,
purifies into [0, 1] and declares how an attack gets its gradient; their pieces (SSP, SOAP's
descent, BPDA, EOT, bit-depth levels) do what they claim."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from kdp.accel import Accel
from kdp.baselines import BASELINES
from kdp.baselines.at_classifier import ATClassifierConfig
from kdp.baselines.e2e_at import E2EATConfig
from kdp.baselines.bitdepth import BitDepth
from kdp.baselines.jpeg import JpegConfig, JpegPurifier
from kdp.baselines.nrp import Critic, NRPConfig, NRPPurifier, NRPTraining, nrp_step, ragan_loss, ssp
from kdp.baselines.soap import SoapConfig, SoapPurifier
from kdp.checkpoint import load_checkpoint
from kdp.data import PurifierData
from kdp.config import ClassifierConfig, EvalConfig, Runtime
from kdp.configio import flatten
from kdp.graph import baseline_stage
from kdp.models import EOT, CifarResNet, Purified, build_model
from kdp.pipeline_config import PipelineConfig
from kdp.stages.classifier import classifier_recipe
from kdp.stages.common import fit_local
from kdp.stages.drivers import untrained_driver
from kdp.stages.evaluate import attack_target

RT = Runtime(device="cpu", progress=False)
TINY = PipelineConfig(nrp=NRPConfig(width=4, blocks=1, critic_width=4, epochs=1, batch_size=64, ssp_steps=1),
                      soap=SoapConfig(arch="resnet8", width=4, epochs=1, batch_size=64, lr=0.01),
                      jpeg=JpegConfig(quality=50),
                      at_classifier=ATClassifierConfig(arch="resnet8", width=4, epochs=1, batch_size=64, steps=1),
                      e2e_at=E2EATConfig(depth=2, width=4, epochs=1, batch_size=64, steps=1))


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, tiny_data):
    cfg = ClassifierConfig(arch="resnet8", width=4, epochs=1, batch_size=64)
    return fit_local(classifier_recipe, cfg, {}, tiny_data, tmp_path_factory.mktemp("clf") / "clf", RT)


def make(name: str, data, out, classifier):
    """Baseline `name` made as the pipeline makes it (kdp.graph.baseline_stage)."""
    stage, defense = baseline_stage(TINY, name), BASELINES[name]
    if defense.recipe is None:
        return untrained_driver(stage, {}, out, SimpleNamespace(rt=RT), None)
    return fit_local(defense.recipe, stage.config, {k: classifier for k in defense.inputs(stage.config)}, data, out, RT)


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_is_made_through_its_stage_reloads_and_purifies_into_unit_range(
        name, tmp_path, tiny_data, tiny_classifier):
    out = make(name, tiny_data, tmp_path / name, tiny_classifier)
    model, meta = load_checkpoint(out, "cpu")
    assert meta["spec"]["name"] == name and meta["config"] == flatten(getattr(TINY, name))
    assert name in TINY.baselines and name in flatten(TINY)["baselines"].split("+")  # on by default
    x = (tiny_data.test_x[:8].float() / 255).requires_grad_(True)
    y = model.eval()(x)
    assert y.shape == x.shape and float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    y.sum().backward()  # an attack gets a gradient: exact, or BPDA's identity where declared
    if getattr(model, "backward", "exact") == "bpda":
        assert torch.equal(x.grad, torch.ones_like(x))
    else:
        assert x.grad is not None and x.grad.abs().sum() > 0
    if BASELINES[name].recipe is not None:  # trained: the weights moved away from the seeded initialization
        torch.manual_seed(getattr(TINY, name).seed)
        fresh = build_model("purifier", name, **meta["spec"]["kwargs"])
        moved = [not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values())
                 if a.is_floating_point()]
        assert any(moved)
        assert len(meta["metrics"]["history"]) == 1
    assert make(name, tiny_data, tmp_path / name, tiny_classifier) == out  # done: kept, not made again


def test_bit_depth_keeps_2_to_the_bits_levels():
    x = torch.rand(2, 3, 32, 32)
    for bits in (1, 4, 5, 8):
        y = BitDepth(bits)(x)
        assert len(torch.unique(y)) <= 2 ** bits and float((y - x).abs().max()) <= 0.5 / (2 ** bits - 1) + 1e-6
    with pytest.raises(ValueError, match="bit depth must be in \\[1, 8\\], got 9"):
        BitDepth(9)


def test_none_is_identity_and_unknown_baseline_lists_valid_ones(tiny_data):
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(build_model("purifier", "none")(x), x)
    with pytest.raises(ValueError, match=", ".join(sorted({"cae", "none", *BASELINES}))):
        build_model("purifier", "nrpx")
    with pytest.raises(ValueError, match="'jpgg'"):
        PipelineConfig(baselines=("jpgg",))


def test_jpeg_changes_images_slightly_and_passes_gradients_by_bpda(tiny_data):
    x = (tiny_data.test_x[:4].float() / 255).requires_grad_(True)
    y = JpegPurifier(quality=30)(x)
    err = (y - x).abs().mean().item()
    assert 0.002 < err < 0.05  # lossy, but the same image
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity backward
    with pytest.raises(ValueError, match="101"):
        JpegPurifier(quality=101)


def test_ssp_increases_feature_distortion_within_eps():
    torch.manual_seed(0)
    f = CifarResNet(depth=8, width=4).eval().features
    x = torch.rand(8, 3, 32, 32)
    eps = 16 / 255
    torch.manual_seed(1)
    one = ssp(f, x, eps, steps=0)  # the random start alone
    torch.manual_seed(1)
    many = ssp(f, x, eps, steps=5)
    dist = lambda z: float(((f(z) - f(x)) ** 2).sum())  # noqa: E731
    assert dist(many) > 1.5 * dist(one)
    assert float((many - x).abs().max()) <= eps + 1e-6 and float(many.min()) >= 0 and float(many.max()) <= 1


def test_nrp_losses_reach_each_network_and_generator_loss_spares_the_critic(tiny_data):
    torch.manual_seed(0)
    clf = CifarResNet(depth=8, width=4).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    pair = NRPTraining(NRPPurifier(width=4, blocks=1), Critic(4))
    step = nrp_step(TINY.nrp, pair, PurifierData(tiny_data, torch.device("cpu")), clf, Accel(torch.device("cpu")))
    out = step(torch.arange(16))
    assert {"loss", "feat", "pixel", "g_adv", "d_loss"} <= set(out)
    (out["g_adv"]).backward(retain_graph=True)
    assert all(p.grad is None for p in pair.critic.parameters())  # the generator term leaves the critic alone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.purifier.parameters())
    out["d_loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.critic.parameters())
    real, fake = torch.full((4,), 3.0), torch.full((4,), -3.0)
    assert ragan_loss(real, fake) < ragan_loss(fake, real)


def test_soap_purification_lowers_the_aux_loss_inside_the_ball():
    torch.manual_seed(0)
    soap = SoapPurifier(arch="resnet8", width=4, eps=8 / 255, steps=5, step_size=2 / 255).eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():  # purification must work even where the caller disabled gradients
        z = soap(x)
        before, after = soap.net.aux_loss(x), soap.net.aux_loss(z)
    assert (after < before).all()
    assert float((z - x).abs().max()) <= 8 / 255 + 1e-6
    assert soap.own_classifier is soap.net and not soap.randomized


def test_soap_rotation_head_adds_a_loss():
    torch.manual_seed(0)
    recon = SoapPurifier(arch="resnet8", width=4, aux="recon").net.eval()
    torch.manual_seed(0)
    both = SoapPurifier(arch="resnet8", width=4, aux="recon+rotation").net.eval()
    x = torch.rand(3, 3, 32, 32)
    logits, aux = both.losses(x)
    assert logits.shape == (3, 10) and aux.shape == (3,)
    assert (both.aux_loss(x) > recon.aux_loss(x)).all()  # + a positive cross-entropy


def test_randomized_defenses_are_attacked_with_eot_and_bpda_is_declared():
    clf = CifarResNet(depth=8, width=4).eval()
    cfg = EvalConfig(eot_samples=5)
    model, grad, eot = attack_target(Purified(NRPPurifier(4, 1, dynamic_std=0.05).eval(), clf), cfg)
    assert isinstance(model, EOT) and eot == 5 and grad == "exact"
    model, grad, eot = attack_target(Purified(NRPPurifier(4, 1).eval(), clf), cfg)
    assert not isinstance(model, EOT) and eot == 1
    assert attack_target(Purified(JpegPurifier(), clf), cfg)[1:] == ("bpda", 1)
    noisy = NRPPurifier(4, 1, dynamic_std=0.1).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(noisy(x), noisy(x))  # really random, so EOT matters
        avg = EOT(nn.Sequential(noisy, clf), 50)(x)
        assert torch.allclose(avg, EOT(nn.Sequential(noisy, clf), 50)(x), atol=0.5)


def test_the_docs_list_every_baseline():
    """docs/evaluation.md's list of defenses (the one prose list of them; README and layout.md
    point to it) names each registered baseline, and nothing else beside `none`."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    section = text.split("## Defenses", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(\w+)`:", section, re.M)
    assert sorted(listed) == sorted(["none", *BASELINES]), listed


def test_a_process_that_never_imported_the_baselines_is_told_how():
    """kdp.models alone (a user's script): a baseline's name is refused in one line that says
    which import registers them; kdp's own modules import it (tests/test_layout.py)."""
    import subprocess
    import sys

    code = ("from kdp.models import build_model\n"
            "try:\n    build_model('purifier', 'nrp')\nexcept ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "unknown purifier 'nrp'" in out and "`import kdp.baselines` registers them" in out
