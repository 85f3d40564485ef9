"""Bootstrap intervals over test images and seeds, from the per-image `hits` of result rows.

A cell (variant, attack, threat model) has one row per replicate (a run or trial, one seed
each), and each row a '0'/'1' string of per-image correctness. A bootstrap draw resamples
the replicates with replacement and, independently, the test images with replacement (the
same image draw for every replicate when they cover the same images); its statistic is the
mean accuracy. The interval is the 2.5 and 97.5 percentiles of B draws. A paired difference
uses the same draws on (variant - reference) per replicate and image.
Draws are seeded, so a report is reproducible. Nothing here knows about parquet or pandas.
"""
from __future__ import annotations

import numpy as np

B = 1000  # bootstrap draws
LEVEL = 0.95


def hits_array(bits: str) -> np.ndarray:
    """'0110' -> array([0., 1., 1., 0.])."""
    return (np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")).astype(np.float64)


def _draws(n_rep: int, n_img: int, b: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replicate weights (b, n_rep) and image weights (b, n_img): multiplicities of a resample."""
    rng = np.random.default_rng(seed)
    rep = rng.multinomial(n_rep, np.full(n_rep, 1 / n_rep), size=b).astype(np.float64)
    img = rng.multinomial(n_img, np.full(n_img, 1 / n_img), size=b).astype(np.float64)
    return rep, img


def _resampled(h: np.ndarray, rep: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Mean of h (n_rep, n_img) under each draw: (b,)."""
    per_rep = img @ h.T / h.shape[1]  # (b, n_rep)
    return (rep * per_rep).sum(1) / h.shape[0]


def interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(lo), float(hi)


def _matrix(replicates: list[np.ndarray]) -> np.ndarray | None:
    lengths = {len(r) for r in replicates}
    return np.stack(replicates) if len(lengths) == 1 and 0 not in lengths else None


def bootstrap(replicates: list[str], b: int = B, seed: int = 0) -> dict | None:
    """{'mean', 'lo', 'hi', 'seeds', 'n'} of accuracy (fractions) over replicates' hits;
    None when there are no hits. Replicates of unequal length are resampled one by one."""
    reps = [hits_array(r) for r in replicates if r]
    if not reps:
        return None
    h = _matrix(reps)
    if h is not None:
        draws = _resampled(h, *_draws(len(reps), h.shape[1], b, seed))
    else:
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(reps), size=(b, len(reps)))
        per = np.stack([_resampled(r[None], np.ones((b, 1)), _draws(1, len(r), b, seed + 1 + i)[1])
                        for i, r in enumerate(reps)], 1)  # (b, n_rep)
        draws = np.take_along_axis(per, pick, 1).mean(1)
    lo, hi = interval(draws)
    mean = float(np.mean([r.mean() for r in reps])) if h is None else float(h.mean())
    return {"mean": mean, "lo": lo, "hi": hi, "seeds": len(reps), "n": int(sum(len(r) for r in reps))}


def paired(replicates: list[str], reference: list[str], b: int = B, seed: int = 0) -> dict | None:
    """Bootstrap of mean(variant - reference) over replicates paired by position (same seed,
    same images); None when they cannot be paired. 'differs': the interval excludes 0."""
    pairs = [(hits_array(a), hits_array(r)) for a, r in zip(replicates, reference) if a and r]
    if not pairs or any(len(a) != len(r) for a, r in pairs) or len({len(a) for a, _ in pairs}) != 1:
        return None
    d = np.stack([a - r for a, r in pairs])
    draws = _resampled(d, *_draws(len(pairs), d.shape[1], b, seed))
    lo, hi = interval(draws)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "differs": bool(lo > 0 or hi < 0)}
