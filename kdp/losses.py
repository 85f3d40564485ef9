"""The paper's losses (Koo, Chae, Lee 2023, Sec. 3.2-3.3). Each takes tensors and returns
a dict whose "loss" is the scalar to minimize; other entries are detached parts for logs.

Equation numbers count the displayed equations of the paper in order: (1) the AE
definition, (2) L_AT, (3) L_NT, (4) L_s, (5) L_kd, (6) L = beta L_s + gamma L_kd.
Images are in [0, 1]; MSE is the mean over pixels and batch (the paper's 1/n sum).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kdp.errors import ConfigError

KD_SPACES = ("pixels", "logits")
ADV_SCORES = ("logprob", "logit")


def nt_loss(restored: torch.Tensor, x: torch.Tensor) -> dict:
    """Eq. (3): L_NT = MSE(f_NT(x), x), the NT teacher restoring clean images."""
    mse = F.mse_loss(restored, x)
    return {"loss": mse, "mse": mse.detach()}


def class_score(logits: torch.Tensor, y: torch.Tensor, score: str = "logprob") -> torch.Tensor:
    """The classifier's score of the true label: log-probability (default) or raw logit."""
    if score not in ADV_SCORES:
        raise ConfigError(f"unknown adv score {score!r}; valid: {', '.join(ADV_SCORES)}")
    z = F.log_softmax(logits, dim=1) if score == "logprob" else logits
    return z.gather(1, y[:, None]).squeeze(1)


def at_loss(purified: torch.Tensor, x: torch.Tensor, logits_purified: torch.Tensor,
            logits_adv: torch.Tensor, y: torch.Tensor, score: str = "logprob") -> dict:
    """Eq. (2): L_AT = MSE(f_AT(x'), x) - log sigma(p_out - adv_out).

    The paper calls p_out and adv_out "the output of the classification model" on the
    purified image f_AT(x') and on the AE x'. kdp reads them as the classifier's score of
    the true label (`score`: log-probability by default, or the logit), so the term
    rewards classifying the purified image correctly with more confidence than the AE.
    adv_out depends only on the fixed AE and carries no gradient.
    """
    mse = F.mse_loss(purified, x)
    p_out = class_score(logits_purified, y, score)
    adv_out = class_score(logits_adv, y, score).detach()
    adv = -F.logsigmoid(p_out - adv_out).mean()
    return {"loss": mse + adv, "mse": mse.detach(), "adv": adv.detach()}


def reconstruction_loss(purified: torch.Tensor, x: torch.Tensor) -> dict:
    """Eq. (4): L_s = MSE(f_s(x'), x), the student's reconstruction of the clean image."""
    mse = F.mse_loss(purified, x)
    return {"loss": mse, "mse": mse.detach()}


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last dim, mean over rows."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                    log_target=True, reduction="batchmean")


def kd_loss(student_out: torch.Tensor, teacher_outs: list[torch.Tensor], space: str = "pixels",
            student_logits: torch.Tensor | None = None,
            teacher_logits: list[torch.Tensor] | None = None) -> dict:
    """Eq. (5): L_kd = (1/M) sum_j [KL(g(f_Tj(.)), g(f_s(x'))) + MSE(f_Tj(.), f_s(x'))].

    g is a softmax; the KL runs from the teacher (target) to the student, as in Hinton et
    al. `space` says what g is applied to:
      - "pixels" (default, the literal reading): each image's flattened 3x32x32 pixels.
        With pixels in [0, 1] these distributions are close to uniform, and for a small
        difference d between two images the KL is about half the variance of d over the
        pixels: it behaves like a second, centred MSE, not a negligible term. Measured on
        the smoke preset's students (docs/results.md), kd_kl is 0.39-0.40 of kd_mse.
      - "logits": the frozen classifier's logits on the teacher and student outputs
        (pass `student_logits` and `teacher_logits`).
    The MSE term always compares the output images.
    """
    if space not in KD_SPACES:
        raise ConfigError(f"unknown kd space {space!r}; valid: {', '.join(KD_SPACES)}")
    if not teacher_outs:
        raise ValueError("kd_loss needs at least one teacher output")
    if space == "logits" and (student_logits is None or teacher_logits is None):
        raise ValueError("kd space 'logits' needs student_logits and teacher_logits")
    kls, mses = [], []
    for j, t_out in enumerate(teacher_outs):
        t_out = t_out.detach()
        if space == "pixels":
            kls.append(_kl(t_out.flatten(1), student_out.flatten(1)))
        else:
            kls.append(_kl(teacher_logits[j].detach(), student_logits))
        mses.append(F.mse_loss(student_out, t_out))
    kl, mse = torch.stack(kls).mean(), torch.stack(mses).mean()
    return {"loss": kl + mse, "kl": kl.detach(), "mse": mse.detach()}


def student_loss(student_out: torch.Tensor, x: torch.Tensor, teacher_outs: list[torch.Tensor],
                 beta: float = 0.5, gamma: float = 0.5, space: str = "pixels",
                 student_logits: torch.Tensor | None = None,
                 teacher_logits: list[torch.Tensor] | None = None) -> dict:
    """Eq. (6): L = beta * L_s + gamma * L_kd (paper: beta = gamma = 0.5)."""
    rec = reconstruction_loss(student_out, x)
    kd = kd_loss(student_out, teacher_outs, space, student_logits, teacher_logits)
    loss = beta * rec["loss"] + gamma * kd["loss"]
    return {"loss": loss, "recon": rec["mse"], "kd": kd["loss"].detach(),
            "kd_kl": kd["kl"], "kd_mse": kd["mse"]}
