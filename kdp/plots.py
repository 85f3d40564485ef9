"""The report's pictures: accuracy bars and sweep lines with bootstrap error bars, and a
Figure-5 grid (originals, their AEs, the purified AEs). Written as PNGs atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kdp.attacks import ATTACKS  # noqa: E402
from kdp.cells import (ATTACK_LABELS, ATTACK_ORDER, CURVE, SWEEP_LABELS, VARIANT_LABELS, VARIANT_ORDER,  # noqa: E402
                       cells, is_sweep, ordered, table1_rows)
from kdp.files import atomic_path  # noqa: E402
from kdp.config import ThreatModel
from kdp.errors import DataError  # noqa: E402

FIGURE_N = 8


def _save(fig, path: str | Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)  # format given: the temp name has no .png suffix
    plt.close(fig)
    return Path(path)


def _accuracy_axes(fig, ax, title: str, path: str | Path) -> Path:
    """Accuracy (%) on 0..100, the title, the legend beside the axes (off the data); saved."""
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _save(fig, path)


def _points(stats: dict, keys: list) -> tuple[list[float], list[float]]:
    """Accuracies and bootstrap half-widths (0 where unknown) of the cells `keys`."""
    got = [stats.get(k) or {} for k in keys]
    return ([c.get("acc") if c.get("acc") is not None else float("nan") for c in got],
            [c.get("hw") or 0.0 for c in got])


def plot_attacks(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Grouped bars: accuracy (%) per attack (groups) and variant (bars), classifier threat model."""
    sub = table1_rows(df)[0]
    sub = sub[sub["threat_model"] == ThreatModel.CLASSIFIER]
    if sub.empty:
        return None
    stats = cells(sub, ["attack", "variant"])
    attacks = ordered(sub["attack"].dropna(), ATTACK_ORDER)
    variants = ordered(sub["variant"].dropna(), VARIANT_ORDER)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(attacks) + 2.5), 4.5))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        ys, errs = _points(stats, [(a, v) for a in attacks])
        ax.bar([i + (j - (len(variants) - 1) / 2) * width for i in range(len(attacks))], ys, width,
               label=VARIANT_LABELS.get(v, v), yerr=errs, capsize=2)
    # tick labels turned so that long ones never meet; the legend beside the axes, off the bars
    ax.set_xticks(range(len(attacks)), [ATTACK_LABELS.get(a, a) for a in attacks], rotation=30, ha="right")
    return _accuracy_axes(fig, ax, "Accuracy on purified images (classifier threat model)", path)


def _clean_on(df: pd.DataFrame, variant: str, n: int) -> float | None:
    """A variant's clean accuracy (%) on the first `n` test images, from its rows' per-image hits."""
    rows = df[(df["variant"] == variant) & (df["attack"] == "clean") & (df["first"].fillna(0) == 0)]
    hits = [h[:n] for h in rows["hits"].dropna() if len(h) >= n]
    return 100 * sum(h.count("1") for h in hits) / (n * len(hits)) if hits and n else None


def plot_eps(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Accuracy (%) against the L-inf radius under `full` (EvalConfig.eps_curve, PGD-20), one line per
    variant, from its clean accuracy on the same images at ε = 0; None without curve rows."""
    sub = table1_rows(df)[0]
    sub = sub[(sub["threat_model"] == ThreatModel.FULL) & sub["attack"].isin(CURVE)]
    if sub.empty:
        return None
    stats = cells(sub, ["variant", "attack"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for v in ordered(sub["variant"].dropna(), VARIANT_ORDER):
        keys = sorted((k for k in stats if k[0] == v), key=lambda k: ATTACKS[k[1]].linf_eps)
        ys, errs = _points(stats, keys)
        xs = [ATTACKS[k[1]].linf_eps * 255 for k in keys]
        clean = _clean_on(df, v, stats[keys[0]]["n"]) if keys else None
        if clean is not None:
            xs, ys, errs = [0.0] + xs, [clean] + ys, [0.0] + errs
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=2, label=VARIANT_LABELS.get(v, v))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("ε (×1/255; 255 = unbounded)")
    return _accuracy_axes(fig, ax, "Accuracy against ε, full white-box threat model (PGD-20)", path)


def plot_grid(df: pd.DataFrame, path: str | Path, attack: str = "pgd8") -> Path | None:
    """Accuracy (%) on `attack` against β, γ and ε, one line per sweep variant (pooled over
    the other two dimensions); None if there are no sweep rows for it."""
    sub = df[is_sweep(df) & (df["threat_model"] == ThreatModel.CLASSIFIER) & (df["attack"] == attack)]
    if sub.empty:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, dim, label in zip(axes, ("sweep.beta", "sweep.gamma", "sweep.eps"), ("β", "γ", "ε (×1/255)")):
        # rounded: float jitter in stored ε (8/255 computed twice) must not split a point
        stats = cells(sub.assign(**{dim: sub[dim].round(9)}), ["sweep.variant", dim])
        for v in ordered({k[0] for k in stats}, tuple(SWEEP_LABELS)):
            keys = sorted(k for k in stats if k[0] == v)
            ys, errs = _points(stats, keys)
            xs = [k[1] * 255 if dim == "sweep.eps" else k[1] for k in keys]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=2, label=SWEEP_LABELS.get(v, v))
        ax.set_xlabel(label)
        ax.set_ylabel(f"{ATTACK_LABELS.get(attack, attack)} accuracy (%)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # off the lines
    fig.suptitle(f"Sweep: {ATTACK_LABELS.get(attack, attack)} accuracy (classifier threat model)")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- Figure 5

def figure5_images(purifier, classifier, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd8",
                   seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean x, AEs crafted on the classifier alone, the purifier's output on the AEs), on CPU."""
    from kdp.attacks import attack_batches, build_attack

    atk = build_attack(attack, classifier)
    x_adv = torch.cat(list(attack_batches(atk, x, y, len(x), seed, 0, device))).cpu()
    with torch.no_grad():
        x_pur = purifier(x_adv.to(device)).cpu()
    return x, x_adv, x_pur


def figure5(purifier_dir, classifier_dir, data, path: str | Path, attack: str = "pgd8", n: int = FIGURE_N,
            seed: int = 0, device="cpu") -> Path:
    """Figure-5-style grid: originals, their AEs, and the purified AEs, with predicted labels."""
    from kdp.checkpoint import load_frozen
    from kdp.data import to_float

    classifier = load_frozen(classifier_dir, device)
    purifier = load_frozen(purifier_dir, device)
    x, y = to_float(data.test_x[:n]), data.test_y[:n]
    if len(x) == 0:
        raise DataError(f"figure5: the data ({data.source}) has no test images")
    images = figure5_images(purifier, classifier, x, y, attack, seed, device)
    titles = ("original", f"AE ({ATTACK_LABELS.get(attack, attack)}, on the classifier)", "purified AE")
    fig, axes = plt.subplots(3, len(x), figsize=(1.3 * len(x), 5), squeeze=False)
    for r, (imgs, title) in enumerate(zip(images, titles)):
        with torch.no_grad():
            pred = classifier(imgs.to(device)).argmax(1).cpu()
        for c in range(len(x)):
            ax = axes[r][c]
            ax.imshow(imgs[c].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            ok = "" if pred[c] == y[c] else " ✗"  # mark misclassified images
            ax.set_xlabel(data.classes[int(pred[c])] + ok, fontsize=7)
        axes[r][0].set_ylabel(title, fontsize=7)
    fig.suptitle(f"Figure 5 (kdp): true labels {', '.join(data.classes[int(t)] for t in y)}", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def figure_inputs(purifier: Path) -> tuple[str | None, str | None]:
    """The classifier and data dir a purifier was trained with, read from its sweep trial's
    trial.json (<trial>/student) or its pipeline run's config.json (<run>/student_*)."""
    from kdp.files import read_json

    trial, run = purifier.parent / "trial.json", purifier.parent / "config.json"
    if trial.is_file():
        t = read_json(trial, "trial.json")
        return t["inputs"]["classifier"], t["config"]["data"]["data_dir"]
    from kdp.pipeline import run_input

    if run.is_file() and run_input(purifier.parent, "classifier").is_dir():
        return str(run_input(purifier.parent, "classifier")), read_json(run, "config.json")["data"]["data_dir"]
    return None, None


