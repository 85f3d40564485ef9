"""The teacher and student step functions (one batch's loss, Eqs. 2-6) on tiny models:
a CAE of depth 1-2 and width 4, a ResNet-8 of width 4, and 8 random images in [0, 1]."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.config import Runtime, StudentConfig, TeacherConfig
from kdp.data import Cifar, PurifierData
from kdp.losses import at_loss, kd_loss, nt_loss, reconstruction_loss, student_loss
from kdp.models import build_model, freeze
from kdp.stages.purifier import student_step, teacher_step

CPU = torch.device("cpu")
RT = Runtime(device="cpu", progress=False)
ACC = Accel.of(RT)  # the reference path
N = 8
IDX = torch.arange(N)
CAE = dict(depth=2, width=4, batch_size=N)


class Recorder(nn.Module):
    """A module that remembers every input it is called on, then runs the wrapped model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


def _cae(depth=2, seed=0):
    torch.manual_seed(seed)
    return build_model("purifier", "cae", depth=depth, width=4)


def _frozen_cae(seed):
    return freeze(_cae(depth=1, seed=seed))


@pytest.fixture
def data():
    """8 random images (uint8, so exactly representable in [0, 1]), labels, and AEs within 8/255."""
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    d = PurifierData(Cifar(x8, y, x8[:2], y[:2], "random"), CPU)
    sign = torch.randint(0, 2, d.x.shape, generator=g).float() * 2 - 1
    d.x_adv = (d.x + 8 / 255 * sign).clamp(0, 1)
    assert d.x.min() >= 0 and d.x.max() <= 1 and not torch.equal(d.x, d.x_adv)
    return d


@pytest.fixture
def classifier():
    torch.manual_seed(1)
    return freeze(build_model("classifier", "resnet8", width=4))


def _finite(out: dict):
    assert out["loss"].dim() == 0 and math.isfinite(out["loss"].item())
    for k, v in out.items():
        assert math.isfinite(float(torch.as_tensor(v).detach())), k


# ---- teachers -------------------------------------------------------------------------------

def test_nt_step_is_the_reconstruction_mse_of_clean_images(data):
    model = Recorder(_cae())
    out = teacher_step(TeacherConfig(kind="nt", **CAE), model, data, None, ACC)(IDX)
    assert set(out) == {"loss", "mse"}
    _finite(out)
    assert len(model.inputs) == 1 and torch.equal(model.inputs[0], data.x)  # NT sees x, not x'
    with torch.no_grad():
        by_hand = ((model.model(data.x) - data.x) ** 2).mean()
    torch.testing.assert_close(out["loss"].detach(), by_hand)
    torch.testing.assert_close(out["mse"], by_hand)
    torch.testing.assert_close(out["loss"].detach(), nt_loss(model.model(data.x), data.x)["loss"].detach())


def test_nt_step_needs_no_classifier_and_trains_the_purifier(data):
    model = _cae()
    out = teacher_step(TeacherConfig(kind="nt", **CAE), model, data, None, ACC)(IDX)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_at_step_is_mse_plus_the_classifier_term_on_aes(data, classifier):
    model = Recorder(_cae())
    out = teacher_step(TeacherConfig(kind="at", **CAE), model, data, classifier, ACC)(IDX)
    assert set(out) == {"loss", "mse", "adv"}
    _finite(out)
    assert len(model.inputs) == 1 and torch.equal(model.inputs[0], data.x_adv)  # AT purifies x'
    with torch.no_grad():
        purified = model.model(data.x_adv)
        mse = ((purified - data.x) ** 2).mean()
        logp = F.log_softmax(classifier(purified), 1).gather(1, data.y[:, None]).squeeze(1)
        logp_adv = F.log_softmax(classifier(data.x_adv), 1).gather(1, data.y[:, None]).squeeze(1)
        adv = -F.logsigmoid(logp - logp_adv).mean()
        expected = at_loss(purified, data.x, classifier(purified), classifier(data.x_adv), data.y)
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["adv"], adv)
    torch.testing.assert_close(out["loss"].detach(), mse + adv)
    torch.testing.assert_close(out["loss"].detach(), expected["loss"])
    assert out["adv"] > 0  # -log sigma(.) of a finite argument


def test_at_step_trains_the_purifier_and_leaves_the_frozen_classifier_alone(data, classifier):
    model = _cae()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    out = teacher_step(TeacherConfig(kind="at", **CAE), model, data, classifier, ACC)(IDX)
    assert out["loss"].requires_grad
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    assert not classifier.training  # BN statistics untouched
    assert all(torch.equal(v, before[k]) for k, v in classifier.state_dict().items())


def test_at_step_adv_score_logit_changes_the_classifier_term(data, classifier):
    model = _cae()
    logprob = teacher_step(TeacherConfig(kind="at", **CAE), model, data, classifier, ACC)(IDX)
    logit = teacher_step(TeacherConfig(kind="at", adv_score="logit", **CAE), model, data, classifier, ACC)(IDX)
    torch.testing.assert_close(logit["mse"], logprob["mse"])  # the same purifier output
    assert not torch.allclose(logit["adv"], logprob["adv"])
    with torch.no_grad():
        purified = model(data.x_adv)
        expected = at_loss(purified, data.x, classifier(purified), classifier(data.x_adv), data.y, "logit")
    torch.testing.assert_close(logit["loss"].detach(), expected["loss"])


# ---- students -------------------------------------------------------------------------------

def _teachers():
    return {"at": Recorder(_frozen_cae(10)), "nt": Recorder(_frozen_cae(11))}


def _student(data, classifier, model=None, **kw):
    """One student step (default: teachers AT + NT, beta = gamma = 0.5, pixels); returns the
    loss dict, the student and the recording teachers."""
    cfg = StudentConfig(**{**CAE, "teachers": ("at", "nt"), **kw})
    teachers = _teachers()
    model = _cae() if model is None else model
    return student_step(cfg, model, data, teachers, classifier, ACC)(IDX), model, teachers


def test_student_step_returns_the_loss_and_its_terms(data, classifier):
    out, model, teachers = _student(data, classifier)
    assert set(out) == {"loss", "recon", "kd", "kd_kl", "kd_mse"}
    _finite(out)
    with torch.no_grad():
        s_out = model(data.x_adv)
        t_outs = [teachers["at"].model(data.x_adv), teachers["nt"].model(data.x)]
        expected = student_loss(s_out, data.x, t_outs, 0.5, 0.5, "pixels")
        rec = reconstruction_loss(s_out, data.x)["loss"]
        kd = kd_loss(s_out, t_outs, "pixels")
    torch.testing.assert_close(out["loss"].detach(), expected["loss"])
    torch.testing.assert_close(out["recon"], rec)
    torch.testing.assert_close(out["kd"], kd["loss"])
    torch.testing.assert_close(out["kd_mse"], kd["mse"])
    torch.testing.assert_close(out["loss"].detach(), 0.5 * rec + 0.5 * kd["loss"])


def test_teachers_see_x_adv_for_at_and_x_for_nt(data, classifier):
    student = Recorder(_cae())
    _, _, teachers = _student(data, classifier, model=student)
    assert len(teachers["at"].inputs) == 1 and torch.equal(teachers["at"].inputs[0], data.x_adv)
    assert len(teachers["nt"].inputs) == 1 and torch.equal(teachers["nt"].inputs[0], data.x)
    assert len(student.inputs) == 1 and torch.equal(student.inputs[0], data.x_adv)  # the student purifies x'


@pytest.mark.parametrize("kind", ["at", "nt"])
def test_a_single_teacher_student_calls_only_that_teacher(data, classifier, kind):
    out, model, teachers = _student(data, classifier, teachers=(kind,))
    other = "nt" if kind == "at" else "at"
    assert len(teachers[kind].inputs) == 1 and teachers[other].inputs == []
    with torch.no_grad():
        s_out = model(data.x_adv)
        t_out = teachers[kind].model(data.x_adv if kind == "at" else data.x)
    torch.testing.assert_close(out["kd"], kd_loss(s_out, [t_out])["loss"])


@pytest.mark.parametrize("beta", [0.5, 1.0, 0.25])
def test_student_with_gamma_zero_is_beta_times_reconstruction(data, classifier, beta):
    out, model, _ = _student(data, classifier, beta=beta, gamma=0.0)
    with torch.no_grad():
        by_hand = ((model(data.x_adv) - data.x) ** 2).mean()
    torch.testing.assert_close(out["loss"].detach(), beta * by_hand)
    torch.testing.assert_close(out["recon"], by_hand)
    assert out["kd"] > 0  # still computed and logged, only weighted by 0


def test_student_with_beta_zero_is_gamma_times_kd(data, classifier):
    out, _, _ = _student(data, classifier, beta=0.0, gamma=2.0)
    torch.testing.assert_close(out["loss"].detach(), 2.0 * out["kd"])


def test_kd_space_logits_differs_from_pixels_and_uses_the_classifier(data, classifier):
    pixels, _, _ = _student(data, classifier, kd_space="pixels")
    logits, model, teachers = _student(data, classifier, kd_space="logits")
    torch.testing.assert_close(pixels["recon"], logits["recon"])  # the same student output
    torch.testing.assert_close(pixels["kd_mse"], logits["kd_mse"])  # the MSE term compares images
    assert not torch.allclose(pixels["kd_kl"], logits["kd_kl"])
    assert not torch.allclose(pixels["loss"], logits["loss"])
    with torch.no_grad():
        s_out = model(data.x_adv)
        t_outs = [teachers["at"].model(data.x_adv), teachers["nt"].model(data.x)]
        expected = student_loss(s_out, data.x, t_outs, 0.5, 0.5, "logits", classifier(s_out),
                                [classifier(t) for t in t_outs])
    torch.testing.assert_close(logits["loss"].detach(), expected["loss"])
    torch.testing.assert_close(logits["kd_kl"], expected["kd_kl"])


@pytest.mark.parametrize("kd_space", ["pixels", "logits"])
def test_student_step_trains_only_the_student(data, classifier, kd_space):
    out, model, teachers = _student(data, classifier, kd_space=kd_space)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    frozen = [*classifier.parameters(), *teachers["at"].parameters(), *teachers["nt"].parameters()]
    assert all(p.grad is None for p in frozen)
