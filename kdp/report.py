"""The analysis report of result tables: paper-shaped markdown tables, plots, a Figure-5 grid.

Input is a DataFrame of `kdp.results.SCHEMA` rows (pipeline runs and/or sweep trials).
Accuracy is always pooled as 100 * sum(correct) / sum(n) over the grouped rows, so shards
and repeated runs combine by their image counts rather than by averaging percentages.
Where rows carry per-image `hits`, each cell also gets half the width of a 95% bootstrap
interval over test images and replicates (seeds); see kdp.stats. Every file is written
under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kdp.cells import (ATTACK_LABELS, ATTACK_ORDER, CURVE, SWEEP_LABELS, TABLE1_VARIANTS, VARIANT_LABELS,  # noqa: F401
                       VARIANT_ORDER, at_setting, cells, codes, is_sweep, legend, not_same_images, ordered, table1_rows,
                       versus)
from kdp.config import THREAT_MODELS, ThreatModel
from kdp.indicators import INDICATORS
from kdp.files import atomic_path
from kdp.compare import budget_line, reference_markdown
from kdp.errors import ConfigError
from kdp.storage import is_uri, open_storage

# Cited paper figures (Koo et al. 2023, Table 1): accuracy (%) of ResNet-56 on purified AEs.
# "original" is the classifier's own clean accuracy, no purifier (the paper's "Original" row,
# the same in every column); the paper reports no clean accuracy after purification.
PAPER_TABLE1 = {
    "original": {"ours": 89.46, "nrp": 89.46, "soap": 89.46},
    "pgd8": {"ours": 40.20, "nrp": 35.07, "soap": 39.14},
    "pgd16": {"ours": 33.57, "nrp": 35.57, "soap": 35.65},
    "fgsm": {"ours": 40.12, "nrp": 39.79, "soap": 37.43},
    "bim": {"ours": 38.37, "nrp": 31.96, "soap": 40.18},
    "cw": {"ours": 56.87, "nrp": 57.24, "soap": 79.22},
    "autoattack": {"ours": 46.91, "nrp": 12.34, "soap": 41.03},
}
# Cited paper figures (Koo et al. 2023, Table 2): the distillation ablation.
PAPER_TABLE2 = {
    "at_teacher": {"pgd8": 34.16, "pgd16": 28.01, "fgsm": 38.07, "bim": 33.29, "cw": 56.54, "autoattack": 43.20},
    "kd_at": {"pgd8": 35.46, "pgd16": 28.70, "fgsm": 38.42, "bim": 34.92, "cw": 56.32, "autoattack": 42.77},
    "kd_nt": {"pgd8": 35.77, "pgd16": 29.47, "fgsm": 36.93, "bim": 34.88, "cw": 57.90, "autoattack": 40.50},
    "kd_at_nt": {"pgd8": 40.20, "pgd16": 33.57, "fgsm": 40.12, "bim": 38.37, "cw": 56.87, "autoattack": 46.91},
}
PAPER_ROWS = (("paper: NRP", "nrp"), ("paper: SOAP", "soap"), ("paper: KD←AT+NT (ours)", "ours"))
THREAT_TEXT = {
    ThreatModel.CLASSIFIER: "`classifier`: AEs crafted on the classifier alone, then purified (the paper's protocol).",
    ThreatModel.FULL: "`full`: white-box attacks through purifier∘classifier (BPDA for non-differentiable "
            "purifiers, EOT for randomized ones).",
    ThreatModel.TRANSFER: "`transfer`: AEs crafted on a separately trained surrogate classifier, then purified."}
DASH = "–"
INTERVAL_TEXT = ("Each kdp cell is the pooled accuracy (%) ± half the width of its 95% bootstrap interval "
                 "(1000 draws over test images and replicate seeds; no ± where rows carry no per-image hits).")


# ---------------------------------------------------------------- aggregation helpers

def _fmt(v) -> str:
    return DASH if v is None or pd.isna(v) else f"{v:.2f}"


def _fmt_cell(c: dict | None, key: str = "acc") -> str:
    if c is None or c.get(key) is None:
        return DASH
    return _fmt(c[key]) + (f" ± {c['hw']:.2f}" if key == "acc" and c.get("hw") is not None else "")


def _marked(c: dict | None, letters: str | None) -> str:
    """A cell with the letters of the indicators its rows fired, bold."""
    return _fmt_cell(c) + (f" **{letters}**" if letters and c is not None else "")


def indicators_markdown(df: pd.DataFrame) -> str:
    """Every fired indicator of attack failure, one line per (run, variant, threat model, attack), with
    its counts and what it means for the number."""
    if "indicators" not in df or not df["indicators"].fillna("").astype(bool).any():
        return ("No indicator of attack failure fired." if "indicators" in df and df["indicators"].notna().any()
                else "No indicator columns in these results (written before kdp recorded them).")
    fired = df[df["indicators"].fillna("").astype(bool)]
    cols = [c for c in ("run", "variant", "threat_model", "attack", "indicators", "indicator_notes") if c in fired]
    rows = [[str(r[c]) for c in cols] for _, r in fired.sort_values(cols[:4]).iterrows()]
    names = sorted({n for v in fired["indicators"] for n in v.split(",") if n}, key=list(INDICATORS).index)
    meaning = [f"- **{INDICATORS[n].code}** `{n}`: {INDICATORS[n].meaning}." for n in names]
    return (f"{len(fired)} row(s) fired an indicator (docs/evaluation.md: how each is computed):\n\n"
            + "\n".join(meaning) + "\n\n" + _markdown(cols, rows))


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _count(df: pd.DataFrame, col: str) -> int:
    return int(df[col].dropna().nunique()) if col in df else 0


# ---------------------------------------------------------------- tables

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


def _column_label(t: str, a: str, c: dict, n_clean: int | None) -> str:
    label = ATTACK_LABELS.get(a, a) if t == ThreatModel.CLASSIFIER else f"{t} {ATTACK_LABELS.get(a, a)}"
    return label + (f" (n={c['n']})" if n_clean and c["n"] < n_clean else "")


def suite_lines(sub: pd.DataFrame, threats: list[str]) -> list[str]:
    """Which attacks, at which settings and on how many images, each threat model's numbers come from,
    and which of them did not run on the same images."""
    lines = []
    for t in threats:
        rows = sub[(sub["threat_model"] == t) & ~sub["attack"].isin(("clean", *CURVE))]
        parts = []
        for a in ordered(rows["attack"].dropna(), ATTACK_ORDER):
            r = rows[rows["attack"] == a]
            settings = r["attack.settings"].dropna() if "attack.settings" in r else pd.Series(dtype=object)
            what = settings.iloc[0] if len(settings) else "settings not recorded"
            parts.append(f"{ATTACK_LABELS.get(a, a)} = {what}, {int(r['n'].max())} images")
        lines.append(f"- `{t}` suite: " + ("; ".join(parts) or DASH) + ".")
        lines += [f"  - {line}." for line in not_same_images(sub, t)]
    return lines


def _table1_caption(sub: pd.DataFrame, source: str, threats: list[str]) -> str:
    lines = [f"Accuracy (%) against the true label; {source}, pooled over {_count(sub, 'run')} run(s), "
             f"{_count(sub, 'trial_id')} sweep trial(s), {len(sub)} rows (counts summed). {INTERVAL_TEXT}",
             "`Original` is the classifier alone on clean images (no purifier), the paper's \"Original\" row; "
             "`Purified clean` is each defense's clean accuracy after purification, which the paper does not "
             "report. Threat models:"]
    lines += [f"- {THREAT_TEXT.get(t, f'`{t}`.')}" for t in threats]
    lines += suite_lines(sub, threats)
    lines.append("The `paper:` rows are copied from the paper's Table 1 (its NRP and SOAP included), only into "
                 "the columns that measure the same quantity: `Original` and the paper's attacks under the "
                 "`classifier` protocol (the paper's AA is placed beside kdp's 10-step `AA`, not `AA (standard)`). "
                 "`checks`: the variant's rows whose sanity checks failed. `Worst case`: an image counts as correct "
                 "only if it is correct clean and under every attack of that threat model, on the images all of them "
                 "ran on (the field's robust accuracy). Letters after a number: X, a sanity check of its rows failed; "
                 "the others, indicators of attack failure its rows fired (legend below the table; section "
                 "*Indicators of attack failure*).")
    budget = budget_line(sub)
    if budget:
        lines.append(budget + " `AT classifier` has no purifier: its `full` rows repeat its `classifier` rows "
                     "where the suites share an attack (one attack on one model, run once: `attack.same_as`).")
    return "\n".join(lines)


def _table1_layout(sub: pd.DataFrame):
    """(columns [(threat, attack)], their labels, cell stats, the variants in order)."""
    stats = cells(sub, ["threat_model", "attack", "variant"])
    threats = ordered(sub["threat_model"].dropna(), THREAT_MODELS)
    cols = [(t, a) for t in threats for a in ordered(sub.loc[sub["threat_model"] == t, "attack"].dropna(),
                                                      ATTACK_ORDER)
            if a not in CURVE and any(k[:2] == (t, a) for k in stats)]
    clean = [c["n"] for k, c in stats.items() if k[:2] == (ThreatModel.CLASSIFIER, "clean")]
    n_clean = max(clean) if clean else None
    labels = [_column_label(t, a, max((c for k, c in stats.items() if k[:2] == (t, a)), key=lambda c: c["n"]),
                            n_clean) for t, a in cols]
    variants = ordered(sub["variant"].dropna(), tuple(dict.fromkeys(TABLE1_VARIANTS + VARIANT_ORDER)))
    return threats, cols, labels, stats, variants


def table1_markdown(df: pd.DataFrame) -> str:
    """Table-1 layout: variants (then the paper's rows) x `Original` and one attack block per
    threat model; then the same layout for agreement with the classifier's clean prediction."""
    sub, source = table1_rows(df)
    if sub.empty:
        return "_No Table 1 rows._"
    threats, cols, labels, stats, variants = _table1_layout(sub)
    original = stats.get((ThreatModel.CLASSIFIER, "clean", "none"))
    header = ["variant", "Original"] + labels + ["checks"]
    rows, agree = [], []
    marks = codes(sub, ["threat_model", "attack", "variant"])
    for v in variants:
        label = VARIANT_LABELS.get(v, v)
        rows.append([label, _fmt_cell(original)] + [_marked(stats.get((t, a, v)), marks.get((t, a, v)))
                                                     for t, a in cols]
                    + [_checks_cell(sub[sub["variant"] == v])])
        agree.append([label] + [_fmt_cell(stats.get((t, a, v)), "agree") for t, a in cols])
    for label, key in PAPER_ROWS:
        cells_ = [_fmt(PAPER_TABLE1.get(a, {}).get(key)) if t == ThreatModel.CLASSIFIER else DASH for t, a in cols]
        rows.append([label, _fmt(PAPER_TABLE1["original"].get(key))] + cells_ + [DASH])
    agreement = ("Agreement (%): the purified image's prediction equals the classifier's prediction on the clean "
                 "image (the paper's \"matches the original prediction\"), same rows and columns, pooled.")
    return (_table1_caption(sub, source, threats) + "\n\n" + _markdown(header, rows) + "\n"
            + "\n".join(legend(sub[~sub["attack"].isin(CURVE)])).replace("\n  ", "\n- ") + "\n\n" + agreement
            + "\n\n" + _markdown(["variant"] + labels, agree))


def table2_source(df: pd.DataFrame, beta: float, gamma: float, eps: float) -> tuple[pd.DataFrame, str]:
    """Classifier-threat-model rows at (β, γ, ε) of Table 2's variants, and their source (a
    sweep trial's `variant` is its `sweep.variant`)."""
    df = df[df["threat_model"] == ThreatModel.CLASSIFIER]
    sweep = is_sweep(df)
    if sweep.any():
        rows = at_setting(df[sweep], beta, gamma, eps)
        return rows, "sweep trials"
    # No sweep: a pipeline run's own variants, filtered on its configured β, γ and AE ε.
    rows = df[df["variant"].isin(list(SWEEP_LABELS))]
    rows = at_setting(rows, beta, gamma, eps, cols=("purifier.beta", "purifier.gamma", "ae.eps"))
    return rows, "pipeline runs"


def _versus_at(rows: pd.DataFrame, v: str, a: str) -> str:
    """'▲'/'▼' when variant v differs from AT-only on attack a beyond noise (paired bootstrap), else ''."""
    test = None if v == "at_teacher" else versus(rows, v, "at_teacher", a)
    return "" if not test or not test["differs"] else (" ▲" if test["diff"] > 0 else " ▼")


def table2_markdown(df: pd.DataFrame, beta: float = 0.5, gamma: float = 0.5, eps: float = 8 / 255) -> str:
    """Table-2 ablation: sweep variants x attacks, each cell 'ours ± interval (paper)', marked
    where it differs from the AT teacher beyond noise."""
    rows, source = table2_source(df, beta, gamma, eps)
    setting = f"β={beta:g}, γ={gamma:g}, ε={eps * 255:g}/255"
    if rows.empty:
        return f"_Table 2: no classifier-threat-model rows at {setting}._"
    stats = cells(rows, ["variant", "attack"])
    attacks = [a for a in ordered(rows["attack"].dropna(), ATTACK_ORDER) if a != "clean"]
    has_hits = "hits" in rows and rows["hits"].notna().any()
    body = []
    for v in ordered(rows["variant"].dropna(), tuple(SWEEP_LABELS)):
        paper = PAPER_TABLE2.get(v, {})
        body.append([SWEEP_LABELS.get(v, v)] + [
            f"{_fmt_cell(stats.get((v, a)))}{_versus_at(rows, v, a) if has_hits else ''} ({_fmt(paper.get(a))})"
            for a in attacks])
    caption = (f"Ablation at {setting}, classifier threat model, accuracy (%) as kdp (paper); from "
               f"{source}: {_count(rows, 'run')} run(s), {_count(rows, 'trial_id')} trial(s), {len(rows)} rows. "
               f"{INTERVAL_TEXT} ▲/▼: above/below the AT teacher (AT, no KD) beyond noise, i.e. the 95% paired "
               "bootstrap interval of the difference (same seeds and images) excludes 0. The paper's AA is its "
               "10-step AutoAttack.")
    return caption + "\n\n" + _markdown(["variant"] + [ATTACK_LABELS.get(a, a) for a in attacks], body)


# ---------------------------------------------------------------- report

def provenance_lines(df: pd.DataFrame) -> list[str]:
    """Where the numbers come from: counts of rows/runs/sweeps/trials, code versions, data size."""
    shas = sorted(df["git_sha"].dropna().unique()) if "git_sha" in df else []
    sizes = sorted(int(s) for s in df["data.train_size"].dropna().unique()) if "data.train_size" in df else []
    acc = df["classifier.test_acc"].dropna() if "classifier.test_acc" in df else pd.Series(dtype=float)
    acc_text = f"{acc.min():.4f} – {acc.max():.4f}" if len(acc) else DASH
    sweeps = _count(df, "sweep_id") if "sweep_id" in df else ("unknown (no sweep_id column)" if
                                                                is_sweep(df).any() else 0)
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
                 attack: str = "pgd8", blends: list[dict] | None = None) -> Path:
    """Write out_dir/report.md and its PNGs; `figure` = (purifier_dir, classifier_dir, data)
    adds the Figure-5 grid for `attack`, `blends` (kdp.analyze records) the blend fit.
    Returns the report.md path."""
    from kdp.plots import figure5, plot_attacks, plot_eps, plot_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {"Accuracy per attack": plot_attacks(df, out / "attacks.png"),
            "Sweep over β, γ, ε": plot_grid(df, out / "grid.png"),
            "Accuracy against ε under `full` (PGD-20; a curve that does not reach ~0 at the unbounded ε is "
            "unbounded_attack_failure)": plot_eps(df, out / "eps.png")}
    if figure is not None:
        pngs["Figure 5"] = figure5(*figure, out / "figure5.png", attack=attack)
    parts = ["# kdp report", "", *provenance_lines(df), ""]
    parts += ["## Table 1", "", table1_markdown(df), ""]
    parts += ["## Table 2 (ablation)", "", table2_markdown(df), ""]
    parts += ["## Against adversarial training", "", reference_markdown(df), ""]
    if blends:
        from kdp.analyze import blend_markdown

        parts += ["## Blend fit (kdp analyze)", "", blend_markdown(blends), ""]
    parts += ["## Sanity checks", "", sanity_markdown(df), ""]
    parts += ["## Indicators of attack failure", "", indicators_markdown(df), ""]
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
    p.add_argument("path", help="a results .parquet file or a directory of them, or a bucket URI (s3://...)")
    p.add_argument("--out", default="report", help="output directory or bucket URI (default: ./report)")
    p.add_argument("--purifier", metavar="DIR", help="purifier checkpoint dir: adds Figure 5 (a sweep trial's "
                   "student or a run's student_* dir: its classifier and data are found from there)")
    p.add_argument("--classifier", metavar="DIR", help="classifier checkpoint dir for Figure 5")
    p.add_argument("--data-dir", help="CIFAR-10 location for Figure 5")
    p.add_argument("--attack", default="pgd8", help="attack shown in Figure 5 (default: pgd8)")


def report_command(args: argparse.Namespace) -> None:
    """`kdp report`: load results, write the report (with Figure 5 if asked), print its path."""
    from kdp.analyze import find_blends
    from kdp.attacks import ATTACKS
    from kdp.data import load_cifar
    from kdp.models import lookup
    from kdp.plots import FIGURE_N, figure_inputs
    from kdp.results import load

    if args.purifier and not (args.classifier and args.data_dir):
        clf, data_dir = figure_inputs(Path(args.purifier))
        args.classifier, args.data_dir = args.classifier or clf, args.data_dir or data_dir
    fig_args = {"--purifier": args.purifier, "--classifier": args.classifier, "--data-dir": args.data_dir}
    given = [k for k, v in fig_args.items() if v is not None]
    if given and len(given) < len(fig_args):
        missing = [k for k in fig_args if k not in given]
        raise ConfigError(f"Figure 5 needs --purifier, --classifier and --data-dir; missing {', '.join(missing)}")
    lookup(ATTACKS, args.attack, "attack")  # fail before any work on a bad --attack
    store = open_storage(args.out)  # a directory, or a bucket: written in its mirror, then published
    store.preflight()
    df = load(args.path)
    figure = None
    if given:
        data = load_cifar(args.data_dir, n_train=0, n_test=FIGURE_N)
        figure = (Path(args.purifier), Path(args.classifier), data)
    blends = [] if is_uri(args.path) else find_blends(args.path)  # blend.json sits in local runs only
    report = write_report(df, store.root, figure, attack=args.attack, blends=blends)
    for f in sorted(p for p in store.root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        store.push(f)
    print(f"report: {store.uri_of(report)}")
