"""What an attack did, read while it runs: the per-row counts behind the indicators of attack failure
(Pintor et al. 2022; AutoAttack's own flags), which kdp.indicators turns into `indicator.*` columns.

- `Traced` wraps the model an attack queries. Every query on the whole batch (an iterate) is read:
  its per-image cross-entropy (the trajectory) and, for each image, the highest-loss point inside the
  budget that the model misclassified. `finish` then scores the point the attack returned: where it
  is not adversarial but an iterate was (silent success), the iterate is returned instead, so that
  every attack returns the best point it found; where the attack failed, a trajectory whose running
  best still rose over its last 10% of steps is incomplete optimization.
- `blackbox_records` counts, for a MultiAttack (AutoAttack), the images that only its black-box piece
  (Square) fooled after the gradient pieces failed.
- `grad_probe` and `stability_probe` look at the defense itself on a few images: per-image input
  gradients that are zero or not finite, and outputs that change between identical passes or jump
  under noise far below ε.
Counts go into rows as `trace.*` columns (summed over shards); none of this changes an AE except a
silent success's, and no random draw of the attack or the scoring.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.attacks import ATTACKS, BLACKBOX

TOL = 1e-6  # float slack on the L-inf budget
TAIL, RISE = 0.1, 0.05  # Pintor's rule: the rescaled running best may rise by at most RISE over the last TAIL of steps
NOISE = 1 / 64  # the stability probe's noise, as a fraction of ε: far below it
JUMP = 0.1  # a loss change above JUMP * max(1, loss) under that noise is sharp
TRACE_KEYS = ("trace.silent", "trace.failed", "trace.incomplete", "trace.blackbox_only")
PROBE_KEYS = ("trace.grad_images", "trace.zero_grad", "trace.probe_images", "trace.unstable", "trace.jumpy")


class Traced(nn.Module):
    """`model`, whose whole-batch queries during one `begin` ... `finish` are read (module docstring)."""

    def __init__(self, model: nn.Module, eps: float | None):
        super().__init__()
        self.model, self.eps, self.x0 = model, eps, None
        self.training = model.training  # torchattacks restores the wrapper's mode onto the model after each attack

    def begin(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x0, self.y, self.losses = x, y, []
        self.best = x.clone()
        self.best_loss = torch.full((len(x),), -math.inf, device=x.device)
        self.found = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.x0 is not None and x.shape == self.x0.shape:
            with torch.no_grad():
                self._see(x.detach(), out.detach())
        return out

    def _see(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        inside = ((x >= 0) & (x <= 1)).flatten(1).all(1)
        if self.eps is not None:
            inside &= (x - self.x0).abs().flatten(1).amax(1) <= self.eps + TOL
        loss = F.cross_entropy(logits.float(), self.y, reduction="none")
        self.losses.append(torch.where(inside, loss, torch.full_like(loss, math.nan)))
        better = inside & (logits.argmax(1) != self.y) & (loss > self.best_loss)
        self.best[better], self.best_loss[better] = x[better], loss[better]
        self.found |= better

    def finish(self, adv: torch.Tensor, trajectory: bool) -> tuple[torch.Tensor, dict]:
        """(the best point per image, this batch's counts); `trajectory`: judge incomplete optimization."""
        found = self.found.clone()  # adversarial iterates before the returned point
        with torch.no_grad(), torch.random.fork_rng(devices=[adv.device] if adv.is_cuda else []):
            pred = self(adv).argmax(1)  # its own draws: a randomized model's later ones stay as they were
        wrong = pred != self.y
        silent = found & ~wrong
        failed = ~wrong & ~found
        counts = {"trace.silent": int(silent.sum()), "trace.failed": int(failed.sum()),
                  "trace.incomplete": int((incomplete(torch.stack(self.losses)) & failed).sum())
                  if trajectory and len(self.losses) > 1 else None}
        best = torch.where(silent[:, None, None, None], self.best, adv)
        self.x0 = None
        return best, counts


class Watch:
    """Around each batch of one attack (kdp.attacks.attack_batches): its Traced model and MultiAttack
    records, their counts summed into `info` (the row's `trace.*` columns) as batches go."""

    def __init__(self, name: str, attack, traced: Traced | None, info: dict):
        self.traced, self.info = traced, info
        self.trajectory = ATTACKS[name].iterates == "ce" if name in ATTACKS else False
        self.records = blackbox_records(attack)
        info.update(dict.fromkeys(TRACE_KEYS))

    def begin(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.traced is not None:
            self.traced.begin(x, y)

    def end(self, adv: torch.Tensor) -> torch.Tensor:
        if self.traced is not None:
            adv, counts = self.traced.finish(adv, self.trajectory)
            for k, v in counts.items():
                self.info[k] = None if v is None else (self.info[k] or 0) + v
        if self.records is not None:
            self.info["trace.blackbox_only"] = blackbox_only(self.records)
        return adv


def incomplete(losses: torch.Tensor) -> torch.Tensor:
    """Per image (column) of a (steps, images) loss trajectory: did the running best of the loss,
    rescaled to [0, 1] over the trajectory, rise by more than RISE over its last TAIL of steps?"""
    lo = torch.nan_to_num(losses, nan=math.inf).amin(0)
    hi = torch.nan_to_num(losses, nan=-math.inf).amax(0)
    span = (hi - lo).clamp_min(1e-12)
    scaled = torch.nan_to_num((losses - lo) / span, nan=0.0).clamp(0, 1)
    best = scaled.cummax(0).values
    last = len(losses) - 1
    return (best[last] - best[math.floor((1 - TAIL) * last)] > RISE) & (hi > lo)


def blackbox_records(attack) -> tuple[object, int] | None:
    """(the MultiAttack inside `attack`, its black-box piece's index), with its per-piece records
    switched on; None when it has no black-box piece after a gradient one."""
    multi = getattr(attack, "_autoattack", attack)
    pieces = getattr(multi, "attacks", None)
    if not pieces or not hasattr(multi, "_multi_atk_records"):
        return None
    box = [i for i, a in enumerate(pieces) if type(a).__name__ in BLACKBOX]
    if not box or box[0] == 0:
        return None
    multi._accumulate_multi_atk_records = True
    multi._multi_atk_records = [0.0] * (len(pieces) + 1)  # images left after each piece, summed over batches
    return multi, box[0]


def blackbox_only(records: tuple[object, int]) -> int:
    """Images that only the black-box piece fooled, all batches so far (MultiAttack runs each piece on
    the images the earlier ones left correct)."""
    multi, i = records
    left = multi._multi_atk_records
    return int(round(left[i] - left[i + 1]))


def traced_model(name: str, model: nn.Module) -> Traced | None:
    """A Traced wrapper for attack `name` on `model`, if its iterates are read (Attack.iterates)."""
    a = ATTACKS.get(name)
    return None if a is None or a.iterates is None else Traced(model, a.linf_eps)


def grad_probe(g: torch.Tensor) -> dict:
    """Counts of a batch's input gradients `g`: images whose gradient is zero or not finite."""
    flat = g.flatten(1)
    bad = (flat.abs().sum(1) == 0) | ~torch.isfinite(flat).all(1)
    return {"trace.grad_images": len(g), "trace.zero_grad": int(bad.sum())}


@torch.no_grad()
def stability_probe(defense: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, draws: int = 2) -> dict:
    """Images whose prediction differs between two identical passes (`trace.unstable`), or whose loss
    jumps under uniform noise of NOISE * ε (`trace.jumpy`). Its draws leave the caller's generator as it was."""
    if len(x) == 0:
        return dict.fromkeys(("trace.probe_images", "trace.unstable", "trace.jumpy"), 0)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(0)
        a, b = defense(x).float(), defense(x).float()
        scale = 1 + a.abs().amax(1)
        unstable = ((a - b).abs().amax(1) > 1e-3 * scale) | (a.argmax(1) != b.argmax(1))
        base = F.cross_entropy(a, y, reduction="none")
        jumpy = torch.zeros_like(unstable)
        for _ in range(draws):
            noisy = (x + (torch.rand_like(x) * 2 - 1) * NOISE * eps).clamp(0, 1)
            loss = F.cross_entropy(defense(noisy).float(), y, reduction="none")
            jumpy |= (loss - base).abs() > JUMP * base.clamp_min(1)
    return {"trace.probe_images": len(x), "trace.unstable": int(unstable.sum()),
            "trace.jumpy": int((jumpy & ~unstable).sum())}
