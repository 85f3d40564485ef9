"""kdp.losses against values worked out by hand (paper Eqs. 2-6)."""
from __future__ import annotations

import math

import pytest
import torch

from kdp.losses import at_loss, class_score, kd_loss, nt_loss, reconstruction_loss, student_loss

LN3 = math.log(3.0)
# KL(p || q) for p = softmax([0, ln 3]) = (1/4, 3/4) and q = softmax([0, 0]) = (1/2, 1/2)
KL_T_S = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
# the other direction, KL(q || p), which the loss must NOT compute
KL_S_T = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- L_NT, L_s


def test_nt_loss_hand_values():
    out = nt_loss(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5))
    assert out["loss"].item() == pytest.approx(0.25)
    out = nt_loss(t([0.0, 1.0], [2.0, 3.0]), torch.zeros(2, 2))
    assert out["loss"].item() == pytest.approx((0 + 1 + 4 + 9) / 4)
    assert out["mse"].item() == pytest.approx(3.5) and not out["mse"].requires_grad


def test_reconstruction_loss_hand_value():
    assert reconstruction_loss(t([1.0, 0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0, 0.0]))["loss"].item() == pytest.approx(0.25)


# ----------------------------------------------------------------------------- L_AT


def test_at_loss_equal_scores_gives_log2():
    """True-label log-probabilities equal (logits shifted by a constant) -> -log sigma(0) = log 2."""
    purified = torch.full((1, 3, 2, 2), 0.5)
    x = torch.zeros(1, 3, 2, 2)
    lp = t([1.0, 2.0, 3.0])
    la = lp + 5.0
    out = at_loss(purified, x, lp, la, torch.tensor([2]))
    assert out["adv"].item() == pytest.approx(math.log(2))
    assert out["mse"].item() == pytest.approx(0.25)
    assert out["loss"].item() == pytest.approx(0.25 + math.log(2))
    # the raw logits differ by 5, so the 'logit' variant gives -log sigma(-5) instead
    out = at_loss(purified, x, lp, la, torch.tensor([2]), score="logit")
    assert out["adv"].item() == pytest.approx(math.log(1 + math.exp(5)))


def test_at_loss_logprob_hand_value_and_batch_mean():
    # row 0: p(y=0 | purified) = 1/2, p(y=0 | adv) = 1/4 -> diff ln 2 -> -log(2/3) = log 1.5
    # row 1: identical logits -> log 2
    lp = t([0.0, 0.0], [1.0, 4.0])
    la = t([0.0, LN3], [1.0, 4.0])
    y = torch.tensor([0, 1])
    out = at_loss(torch.zeros(2, 1), torch.zeros(2, 1), lp, la, y)
    assert out["adv"].item() == pytest.approx((math.log(1.5) + math.log(2)) / 2)
    assert out["mse"].item() == 0.0


def test_at_loss_logit_variant_hand_value():
    out = at_loss(torch.zeros(1, 1), torch.zeros(1, 1), t([0.0, 3.0]), t([0.0, 1.0]), torch.tensor([1]),
                  score="logit")
    assert out["adv"].item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_at_loss_gradients():
    purified = torch.full((1, 2), 0.5, requires_grad=True)
    lp = t([0.0, 0.0]).requires_grad_()
    la = t([0.0, 1.0]).requires_grad_()
    out = at_loss(purified, torch.zeros(1, 2), lp, la, torch.tensor([1]))
    out["loss"].backward()
    assert la.grad is None  # adv_out is a constant target
    assert purified.grad is not None and torch.allclose(purified.grad, torch.tensor([[0.5, 0.5]]))
    # raising the true-label logit of the purified image lowers the loss
    assert lp.grad[0, 1].item() < 0 < lp.grad[0, 0].item()


def test_class_score_and_unknown_score():
    logits = t([0.0, LN3])
    assert class_score(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75))
    assert class_score(logits, torch.tensor([1]), "logit").item() == pytest.approx(LN3)
    with pytest.raises(ValueError, match="logprob, logit"):
        class_score(logits, torch.tensor([1]), "prob")
    with pytest.raises(ValueError, match="'margin'"):
        at_loss(torch.zeros(1, 1), torch.zeros(1, 1), logits, logits, torch.tensor([0]), score="margin")


# ----------------------------------------------------------------------------- L_kd


def test_kd_identical_is_zero():
    torch.manual_seed(0)
    s = torch.rand(2, 3, 8, 8)
    out = kd_loss(s, [s.clone()])
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["mse"].item() == 0.0 and out["loss"].item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.randn(2, 10)
    out = kd_loss(s, [s.clone()], "logits", logits, [logits.clone()])
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-7) and out["mse"].item() == 0.0


def test_kd_pixels_two_element_hand_value():
    student = t([0.0, 0.0])
    teacher = t([0.0, LN3])
    out = kd_loss(student, [teacher])
    assert out["kl"].item() == pytest.approx(KL_T_S)  # teacher is the target distribution
    assert abs(KL_T_S - KL_S_T) > 1e-3  # (so the direction is really checked)
    assert out["mse"].item() == pytest.approx(LN3 ** 2 / 2)
    assert out["loss"].item() == pytest.approx(KL_T_S + LN3 ** 2 / 2)


def test_kd_pixels_flattens_images_and_means_over_rows():
    # one image whose 4 pixels are (0, 0, 0, ln 3) vs all zeros, and one identical image
    s = torch.zeros(2, 1, 2, 2)
    tt = torch.zeros(2, 1, 2, 2)
    tt[0, 0, 1, 1] = LN3
    # p = softmax(0,0,0,ln3) = (1/6, 1/6, 1/6, 1/2); q = uniform 1/4
    kl0 = 3 * (1 / 6) * math.log((1 / 6) / 0.25) + 0.5 * math.log(0.5 / 0.25)
    out = kd_loss(s, [tt])
    assert out["kl"].item() == pytest.approx(kl0 / 2)  # batchmean: per image, not per pixel
    assert out["mse"].item() == pytest.approx(LN3 ** 2 / 8)


def test_kd_logits_space_uses_logits():
    img = torch.full((1, 2), 0.3)
    with pytest.raises(ValueError, match="needs student_logits and teacher_logits"):
        kd_loss(img, [img.clone()], "logits")
    with pytest.raises(ValueError, match="needs student_logits"):
        kd_loss(img, [img.clone()], "logits", student_logits=t([0.0, 0.0]))
    out = kd_loss(img, [img.clone()], "logits", t([0.0, 0.0]), [t([0.0, LN3])])
    assert out["kl"].item() == pytest.approx(KL_T_S)
    assert out["mse"].item() == 0.0
    # the same images in pixel space: no divergence at all
    assert kd_loss(img, [img.clone()], "pixels", t([0.0, 0.0]), [t([0.0, LN3])])["kl"].item() == pytest.approx(0.0)


def test_kd_averages_over_teachers():
    s = t([0.0, 0.0])
    one = kd_loss(s, [t([0.0, LN3])])
    both = kd_loss(s, [t([0.0, LN3]), t([0.0, 0.0])])
    assert both["kl"].item() == pytest.approx(KL_T_S / 2)
    assert both["mse"].item() == pytest.approx(LN3 ** 2 / 4)
    assert both["loss"].item() == pytest.approx((one["loss"].item() + 0.0) / 2)
    # logits space, M = 2
    out = kd_loss(s, [s, s], "logits", t([0.0, 0.0]), [t([0.0, LN3]), t([0.0, 0.0])])
    assert out["kl"].item() == pytest.approx(KL_T_S / 2)


def test_kd_teachers_get_no_gradient():
    s = t([0.2, 0.4]).requires_grad_()
    teacher = t([0.0, 1.0]).requires_grad_()
    kd_loss(s, [teacher])["loss"].backward()
    assert teacher.grad is None and s.grad is not None


def test_kd_errors():
    s = t([0.0, 0.0])
    with pytest.raises(ValueError, match="pixels, logits"):
        kd_loss(s, [s], "features")
    with pytest.raises(ValueError, match="at least one teacher"):
        kd_loss(s, [])


# ----------------------------------------------------------------------------- Eq. 6


def test_student_loss_weights():
    s = t([0.0, 0.0])
    x = t([1.0, 1.0])  # L_s = 1
    teacher = t([0.0, LN3])  # L_kd = KL_T_S + ln(3)^2 / 2
    l_kd = KL_T_S + LN3 ** 2 / 2
    out = student_loss(s, x, [teacher], beta=0.3, gamma=0.7)
    assert out["loss"].item() == pytest.approx(0.3 * 1.0 + 0.7 * l_kd)
    assert out["recon"].item() == pytest.approx(1.0)
    assert out["kd"].item() == pytest.approx(l_kd)
    assert out["kd_kl"].item() == pytest.approx(KL_T_S)
    assert out["kd_mse"].item() == pytest.approx(LN3 ** 2 / 2)
    # the paper's default beta = gamma = 0.5
    assert student_loss(s, x, [teacher])["loss"].item() == pytest.approx(0.5 * (1.0 + l_kd))
    with pytest.raises(ValueError, match="unknown kd space"):
        student_loss(s, x, [teacher], space="pixel")
