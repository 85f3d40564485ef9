"""The analysis report of result tables: paper-shaped markdown tables, plots, a Figure-5 grid.

Input is a DataFrame of `kdp.results.SCHEMA` rows (pipeline runs and/or sweep trials).
Accuracy is always pooled as 100 * sum(correct) / sum(n) over the grouped rows, so shards
and repeated runs combine by their image counts rather than by averaging percentages.
Every file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kdp.checkpoint import atomic_path  # noqa: E402

# Cited paper figures (Koo et al. 2023, Table 1): accuracy (%) of ResNet-56 on purified AEs.
PAPER_TABLE1 = {
    "clean": {"ours": 89.46, "nrp": 89.46, "soap": 89.46},
    "pgd8": {"ours": 40.20, "nrp": 35.07, "soap": 39.14},
    "pgd16": {"ours": 33.57, "nrp": 35.57, "soap": 35.65},
    "fgsm": {"ours": 40.12, "nrp": 39.79, "soap": 37.43},
    "bim": {"ours": 38.37, "nrp": 31.96, "soap": 40.18},
    "cw": {"ours": 56.87, "nrp": 57.24, "soap": 79.22},
    "autoattack": {"ours": 46.91, "nrp": 12.34, "soap": 41.03},
}
# Cited paper figures (Koo et al. 2023, Table 2): the distillation ablation.
PAPER_TABLE2 = {
    "at_only": {"pgd8": 34.16, "pgd16": 28.01, "fgsm": 38.07, "bim": 33.29, "cw": 56.54, "autoattack": 43.20},
    "kd_at": {"pgd8": 35.46, "pgd16": 28.70, "fgsm": 38.42, "bim": 34.92, "cw": 56.32, "autoattack": 42.77},
    "kd_nt": {"pgd8": 35.77, "pgd16": 29.47, "fgsm": 36.93, "bim": 34.88, "cw": 57.90, "autoattack": 40.50},
    "kd_at_nt": {"pgd8": 40.20, "pgd16": 33.57, "fgsm": 40.12, "bim": 38.37, "cw": 56.87, "autoattack": 46.91},
}
ATTACK_ORDER = ("clean", "pgd8", "pgd16", "fgsm", "bim", "cw", "autoattack")
ATTACK_LABELS = {"clean": "Original", "pgd8": "PGD8", "pgd16": "PGD16", "fgsm": "FGSM", "bim": "BIM",
                 "cw": "CW", "autoattack": "AA"}
VARIANT_ORDER = ("none", "jpeg", "nrp", "soap", "at_teacher", "nt_teacher", "kd_at", "kd_nt", "kd_at_nt")
# Table 1 rows: the paper's comparison first, then any other variant present.
TABLE1_VARIANTS = ("none", "jpeg", "nrp", "soap", "at_teacher", "kd_at_nt")
VARIANT_LABELS = {"none": "none (undefended)", "jpeg": "JPEG", "nrp": "NRP", "soap": "SOAP",
                  "at_teacher": "AT teacher", "kd_at_nt": "student KD←AT+NT"}
PAPER_ROWS = (("paper: NRP", "nrp"), ("paper: SOAP", "soap"), ("paper: KD←AT+NT (ours)", "ours"))
THREAT_ORDER = ("classifier", "full", "transfer")
THREAT_TEXT = {
    "classifier": "`classifier`: AEs crafted on the classifier alone, then purified (the paper's protocol).",
    "full": "`full`: white-box attacks through purifier∘classifier (BPDA for non-differentiable "
            "purifiers, EOT for randomized ones).",
    "transfer": "`transfer`: AEs crafted on a separately trained surrogate classifier, then purified."}
SWEEP_LABELS = {"at_only": "AT, no KD", "kd_at": "KD ← AT", "kd_nt": "KD ← NT", "kd_at_nt": "KD ← AT+NT"}
# A pipeline run's variant -> the Table 2 row it stands for (used when there are no sweep rows).
VARIANT_TO_SWEEP = {"at_teacher": "at_only", "kd_at": "kd_at", "kd_nt": "kd_nt", "kd_at_nt": "kd_at_nt"}
TOL = 1e-6
DASH = "–"
FIGURE_N = 8


# ---------------------------------------------------------------- aggregation helpers

def pooled(df: pd.DataFrame, by: list[str]) -> pd.Series:
    """Accuracy (%) per group, pooled by summing counts (valid across shards and runs)."""
    agg = df.groupby(by, dropna=True)[["correct", "n"]].sum()
    agg = agg[agg["n"] > 0]
    return (100 * agg["correct"] / agg["n"]).rename("accuracy")


def _ordered(values, order) -> list:
    present = set(values)
    return [v for v in order if v in present] + sorted(v for v in present if v not in order)


def _is_sweep(df: pd.DataFrame) -> pd.Series:
    col = df["sweep.variant"] if "sweep.variant" in df else pd.Series(None, index=df.index, dtype=object)
    return col.notna()


def _near(col: pd.Series, value: float) -> pd.Series:
    """Float-tolerant equality; a null value matches anything (e.g. β of an AT-only trial)."""
    return col.isna() | ((col - value).abs() <= TOL)


def _at_setting(df, beta, gamma, eps, cols=("sweep.beta", "sweep.gamma", "sweep.eps")) -> pd.DataFrame:
    """Rows whose (β, γ, ε) columns match the requested setting."""
    mask = pd.Series(True, index=df.index)
    for col, value in zip(cols, (beta, gamma, eps)):
        if col in df:
            mask &= _near(df[col].astype(float), value)
    return df[mask]


def _fmt(v) -> str:
    return DASH if v is None or pd.isna(v) else f"{v:.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _count(df: pd.DataFrame, col: str) -> int:
    return int(df[col].dropna().nunique()) if col in df else 0


# ---------------------------------------------------------------- tables

def table1_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows Table 1 describes and their source: pipeline runs when any exist, else sweep
    trials at the paper's β = γ = 0.5, ε = 8/255 (pooling other settings would mix them)."""
    sweep = _is_sweep(df)
    if (~sweep).any():
        return df[~sweep], "pipeline runs"
    return _at_setting(df[sweep], 0.5, 0.5, 8 / 255), "sweep trials at β=γ=0.5, ε=8/255"


def _failed(df: pd.DataFrame) -> pd.Series | None:
    """Rows whose sanity checks failed (checks_ok == False); None if no row recorded checks."""
    if "checks_ok" not in df or df["checks_ok"].isna().all():
        return None
    return (df["checks_ok"].astype("boolean") == False).fillna(False).astype(bool)  # noqa: E712


def _checks_cell(df: pd.DataFrame) -> str:
    """'ok', 'N failed (names)' or DASH when the rows recorded no checks."""
    failed = _failed(df)
    if failed is None:
        return DASH
    if not failed.any():
        return "ok"
    raw = df.loc[failed, "check_failures"].dropna() if "check_failures" in df else []
    names = sorted({n.strip() for s in raw for n in str(s).split(",") if n.strip()})
    return f"{int(failed.sum())} failed" + (f" ({', '.join(names)})" if names else "")


def _table1_caption(sub: pd.DataFrame, source: str, threats: list[str]) -> str:
    lines = [f"Accuracy (%) on purified images; {source}, pooled over {_count(sub, 'run')} run(s), "
             f"{_count(sub, 'trial_id')} sweep trial(s), {len(sub)} rows (counts summed). Threat models:"]
    lines += [f"- {THREAT_TEXT.get(t, f'`{t}`.')}" for t in threats]
    lines.append("The `paper:` rows are copied from the paper's Table 1 (its NRP and SOAP included) and exist "
                 "only for the `classifier` protocol; kdp's JPEG/NRP/SOAP rows come from the same run as its "
                 "other rows. `checks`: the variant's rows whose sanity checks failed.")
    return "\n".join(lines)


def table1_markdown(df: pd.DataFrame) -> str:
    """Table-1 layout: variants (then the paper's rows) x one attack block per threat model."""
    sub, source = table1_rows(df)
    if sub.empty:
        return "_No Table 1 rows._"
    acc = pooled(sub, ["threat_model", "attack", "variant"])
    threats = _ordered(sub["threat_model"].dropna(), THREAT_ORDER)
    cols = [(t, a) for t in threats
            for a in _ordered(sub.loc[sub["threat_model"] == t, "attack"].dropna(), ATTACK_ORDER)]
    header = ["variant"] + [f"{t} {ATTACK_LABELS.get(a, a)}" for t, a in cols] + ["checks"]
    rows = []
    for v in _ordered(sub["variant"].dropna(), tuple(dict.fromkeys(TABLE1_VARIANTS + VARIANT_ORDER))):
        cells = [_fmt(acc.get((t, a, v))) for t, a in cols]
        rows.append([VARIANT_LABELS.get(v, v)] + cells + [_checks_cell(sub[sub["variant"] == v])])
    for label, key in PAPER_ROWS:
        cells = [_fmt(PAPER_TABLE1.get(a, {}).get(key)) if t == "classifier" else DASH for t, a in cols]
        rows.append([label] + cells + [DASH])
    return _table1_caption(sub, source, threats) + "\n\n" + _markdown(header, rows)


def table2_source(df: pd.DataFrame, beta: float, gamma: float, eps: float) -> tuple[pd.DataFrame, str]:
    """Classifier-threat-model rows at (β, γ, ε) with a `table2_variant` column, and their source."""
    df = df[df["threat_model"] == "classifier"]
    sweep = _is_sweep(df)
    if sweep.any():
        rows = _at_setting(df[sweep], beta, gamma, eps)
        return rows.assign(table2_variant=rows["sweep.variant"]), "sweep trials"
    # No sweep: a pipeline run's own variants, filtered on its configured β, γ and AE ε.
    rows = df[df["variant"].isin(list(VARIANT_TO_SWEEP))]
    rows = _at_setting(rows, beta, gamma, eps, cols=("purifier.beta", "purifier.gamma", "ae.eps"))
    return rows.assign(table2_variant=rows["variant"].map(VARIANT_TO_SWEEP)), "pipeline runs"


def table2_markdown(df: pd.DataFrame, beta: float = 0.5, gamma: float = 0.5, eps: float = 8 / 255) -> str:
    """Table-2 ablation: sweep variants x attacks, each cell 'ours (paper)'."""
    rows, source = table2_source(df, beta, gamma, eps)
    setting = f"β={beta:g}, γ={gamma:g}, ε={eps * 255:g}/255"
    if rows.empty:
        return f"_Table 2: no classifier-threat-model rows at {setting}._"
    acc = pooled(rows, ["table2_variant", "attack"])
    attacks = [a for a in _ordered(rows["attack"].dropna(), ATTACK_ORDER) if a != "clean"]
    body = []
    for v in _ordered(rows["table2_variant"].dropna(), tuple(SWEEP_LABELS)):
        paper = PAPER_TABLE2.get(v, {})
        body.append([SWEEP_LABELS.get(v, v)] + [f"{_fmt(acc.get((v, a)))} ({_fmt(paper.get(a))})"
                                                for a in attacks])
    caption = (f"Ablation at {setting}, classifier threat model, accuracy (%) as kdp (paper); from "
               f"{source}: {_count(rows, 'run')} run(s), {_count(rows, 'trial_id')} trial(s), {len(rows)} rows.")
    return caption + "\n\n" + _markdown(["variant"] + [ATTACK_LABELS.get(a, a) for a in attacks], body)


# ---------------------------------------------------------------- plots

def _save(fig, path: str | Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)  # format given: the temp name has no .png suffix
    plt.close(fig)
    return Path(path)


def plot_attacks(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Grouped bars: accuracy (%) per attack (groups) and variant (bars), classifier threat model."""
    sub = table1_rows(df)[0]
    sub = sub[sub["threat_model"] == "classifier"]
    if sub.empty:
        return None
    acc = pooled(sub, ["attack", "variant"])
    attacks = _ordered(sub["attack"].dropna(), ATTACK_ORDER)
    variants = _ordered(sub["variant"].dropna(), VARIANT_ORDER)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(attacks)), 4))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        ys = [acc.get((a, v), float("nan")) for a in attacks]
        ax.bar([i + (j - (len(variants) - 1) / 2) * width for i in range(len(attacks))], ys, width, label=v)
    ax.set_xticks(range(len(attacks)), [ATTACK_LABELS.get(a, a) for a in attacks])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy on purified images (classifier threat model)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grid(df: pd.DataFrame, path: str | Path, attack: str = "pgd8") -> Path | None:
    """Accuracy (%) on `attack` against β, γ and ε, one line per sweep variant (pooled over
    the other two dimensions); None if there are no sweep rows for it."""
    sub = df[_is_sweep(df) & (df["threat_model"] == "classifier") & (df["attack"] == attack)]
    if sub.empty:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, dim, label in zip(axes, ("sweep.beta", "sweep.gamma", "sweep.eps"), ("β", "γ", "ε (×1/255)")):
        # rounded: float jitter in stored ε (8/255 computed twice) must not split a point
        acc = pooled(sub.assign(**{dim: sub[dim].round(9)}), ["sweep.variant", dim])
        for v in _ordered(acc.index.get_level_values(0), tuple(SWEEP_LABELS)):
            s = acc.loc[v].sort_index()
            xs = s.index * 255 if dim == "sweep.eps" else s.index
            ax.plot(xs, s.values, marker="o", label=SWEEP_LABELS.get(v, v))
        ax.set_xlabel(label)
        ax.set_ylabel(f"{ATTACK_LABELS.get(attack, attack)} accuracy (%)")
    axes[0].legend(fontsize=8)
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
    from kdp.checkpoint import load_checkpoint
    from kdp.data import to_float
    from kdp.models import freeze

    classifier = freeze(load_checkpoint(classifier_dir, device)[0])
    purifier = freeze(load_checkpoint(purifier_dir, device)[0])
    x, y = to_float(data.test_x[:n]), data.test_y[:n]
    if len(x) == 0:
        raise ValueError(f"figure5: the data ({data.source}) has no test images")
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


# ---------------------------------------------------------------- report

def provenance_lines(df: pd.DataFrame) -> list[str]:
    """Where the numbers come from: counts of rows/runs/sweeps/trials, code versions, data size."""
    shas = sorted(df["git_sha"].dropna().unique()) if "git_sha" in df else []
    sizes = sorted(int(s) for s in df["data.train_size"].dropna().unique()) if "data.train_size" in df else []
    acc = df["classifier.test_acc"].dropna() if "classifier.test_acc" in df else pd.Series(dtype=float)
    acc_text = f"{acc.min():.4f} – {acc.max():.4f}" if len(acc) else DASH
    sweeps = _count(df, "sweep_id") if "sweep_id" in df else ("unknown (no sweep_id column)" if
                                                                _is_sweep(df).any() else 0)
    return [f"- rows: {len(df)}; runs: {_count(df, 'run')}; sweeps: {sweeps}; trials: {_count(df, 'trial_id')}",
            f"- git_sha: {', '.join(shas) or DASH}",
            f"- data.train_size: {', '.join(map(str, sizes)) or DASH}",
            f"- classifier.test_acc: {acc_text}"]


def sanity_markdown(df: pd.DataFrame) -> str:
    """The rows whose sanity checks failed, grouped (shards of one run collapse into one line)."""
    failed = _failed(df)
    if failed is None:
        return "No sanity-check columns in these results."
    if not failed.any():
        return "All recorded sanity checks passed."
    cols = [c for c in ("run", "trial_id", "variant", "attack", "threat_model", "check_failures")
            if c in df and df.loc[failed, c].notna().any()]
    groups = df[failed].groupby(cols, dropna=False, sort=True).size()
    rows = [[DASH if pd.isna(k) else str(k) for k in (key if isinstance(key, tuple) else (key,))] + [str(n)]
            for key, n in groups.items()]
    return (f"{int(failed.sum())} row(s) with failed sanity checks:\n\n" + _markdown(cols + ["rows"], rows))


def write_report(df: pd.DataFrame, out_dir: str | Path, figure: tuple | None = None,
                 attack: str = "pgd8") -> Path:
    """Write out_dir/report.md and its PNGs; `figure` = (purifier_dir, classifier_dir, data)
    adds the Figure-5 grid for `attack`. Returns the report.md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {"Accuracy per attack": plot_attacks(df, out / "attacks.png"),
            "Sweep over β, γ, ε": plot_grid(df, out / "grid.png")}
    if figure is not None:
        pngs["Figure 5"] = figure5(*figure, out / "figure5.png", attack=attack)
    parts = ["# kdp report", "", *provenance_lines(df), ""]
    parts += ["## Table 1", "", table1_markdown(df), ""]
    parts += ["## Table 2 (ablation)", "", table2_markdown(df), ""]
    parts += ["## Sanity checks", "", sanity_markdown(df), ""]
    for title, p in pngs.items():
        if p is not None:
            parts += [f"## {title}", "", f"![{title}]({p.name})", ""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path


# ---------------------------------------------------------------- CLI hooks

def add_report_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kdp report`."""
    p.add_argument("path", help="a results .parquet file or a directory of them")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    p.add_argument("--purifier", metavar="DIR", help="purifier checkpoint dir: adds Figure 5 (a sweep trial's "
                   "student or a run's student_* dir: its classifier and data are found from there)")
    p.add_argument("--classifier", metavar="DIR", help="classifier checkpoint dir for Figure 5")
    p.add_argument("--data-dir", help="CIFAR-10 location for Figure 5")
    p.add_argument("--attack", default="pgd8", help="attack shown in Figure 5 (default: pgd8)")


def _figure_inputs(purifier: Path) -> tuple[str | None, str | None]:
    """The classifier and data dir a purifier was trained with, read from its sweep trial's
    trial.json (<trial>/student) or its pipeline run's config.json (<run>/student_*)."""
    from kdp.checkpoint import read_json

    trial, run = purifier.parent / "trial.json", purifier.parent / "config.json"
    if trial.is_file():
        t = read_json(trial, "trial.json")
        return t["inputs"]["classifier"], t["config"]["data"]["data_dir"]
    if run.is_file() and (purifier.parent / "classifier").is_dir():
        return str(purifier.parent / "classifier"), read_json(run, "config.json")["data"]["data_dir"]
    return None, None


def report_command(args: argparse.Namespace) -> None:
    """`kdp report`: load results, write the report (with Figure 5 if asked), print its path."""
    from kdp.attacks import ATTACKS
    from kdp.data import load_cifar
    from kdp.models import lookup
    from kdp.results import load

    if args.purifier and not (args.classifier and args.data_dir):
        clf, data_dir = _figure_inputs(Path(args.purifier))
        args.classifier, args.data_dir = args.classifier or clf, args.data_dir or data_dir
    fig_args = {"--purifier": args.purifier, "--classifier": args.classifier, "--data-dir": args.data_dir}
    given = [k for k, v in fig_args.items() if v is not None]
    if given and len(given) < len(fig_args):
        missing = [k for k in fig_args if k not in given]
        raise ValueError(f"Figure 5 needs --purifier, --classifier and --data-dir; missing {', '.join(missing)}")
    lookup(ATTACKS, args.attack, "attack")  # fail before any work on a bad --attack
    df = load(args.path)
    figure = None
    if given:
        data = load_cifar(args.data_dir, n_train=0, n_test=FIGURE_N)
        figure = (Path(args.purifier), Path(args.classifier), data)
    print(f"report: {write_report(df, args.out, figure, attack=args.attack)}")
