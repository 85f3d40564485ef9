"""The cells every table and plot of a report shows: attack and variant labels and orders (one
label per variant everywhere), and accuracy pooled over shards, runs and seeds by summing
counts, with the half-width of its 95% bootstrap interval where rows carry per-image hits."""
from __future__ import annotations

import pandas as pd

from kdp import proxy
from kdp.attacks import ATTACKS
from kdp.baselines import BASELINES
from kdp.indicators import INDICATORS, WORST
from kdp.stats import bootstrap, paired

# clean first, then the attacks in their declaration order (kdp.attacks.ATTACKS: `autoattack` is
# torchattacks' 10-step AutoAttack, the paper's likely setting; `aa-standard` the original strengths)
ATTACK_ORDER = ("clean", *ATTACKS, WORST)
ATTACK_LABELS = {"clean": "Purified clean", **{n: a.label for n, a in ATTACKS.items()}, WORST: "Worst case",
                 proxy.ATTACK: f"PGD-{proxy.STEPS} proxy: stopped early"}  # a stopped sweep trial's one row
CURVE = tuple(n for n, a in ATTACKS.items() if a.curve)  # the ε curve's rows: in its plot, not in tables
# the baselines (kdp.baselines, in registration order) after the undefended classifier
VARIANT_ORDER = ("none", *BASELINES, "at_teacher", "nt_teacher", "kd_at", "kd_nt", "kd_at_nt")
# Table 1 rows: the paper's comparison first, then any other variant present.
TABLE1_VARIANTS = ("none", *(n for n, d in BASELINES.items() if d.in_table1), "at_teacher", "kd_at_nt")
VARIANT_LABELS = {"none": "none (undefended)", **{n: d.label for n, d in BASELINES.items()},
                  "at_teacher": "AT teacher", "nt_teacher": "NT teacher", "kd_at": "student KD←AT",
                  "kd_nt": "student KD←NT", "kd_at_nt": "student KD←AT+NT"}
SWEEP_LABELS = {"at_teacher": "AT, no KD", "kd_at": "KD ← AT", "kd_nt": "KD ← NT", "kd_at_nt": "KD ← AT+NT"}
TOL = 1e-6


def pooled(df: pd.DataFrame, by: list[str]) -> pd.Series:
    """Accuracy (%) per group, pooled by summing counts (valid across shards and runs)."""
    agg = df.groupby(by, dropna=True)[["correct", "n"]].sum()
    agg = agg[agg["n"] > 0]
    return (100 * agg["correct"] / agg["n"]).rename("accuracy")


def ordered(values, order) -> list:
    present = set(values)
    return [v for v in order if v in present] + sorted(v for v in present if v not in order)


def is_sweep(df: pd.DataFrame) -> pd.Series:
    col = df["sweep.variant"] if "sweep.variant" in df else pd.Series(None, index=df.index, dtype=object)
    return col.notna()


def _near(col: pd.Series, value: float) -> pd.Series:
    """Float-tolerant equality; a null value matches anything (e.g. β of an AT-only trial)."""
    return col.isna() | ((col - value).abs() <= TOL)


def at_setting(df, beta, gamma, eps, cols=("sweep.beta", "sweep.gamma", "sweep.eps")) -> pd.DataFrame:
    """Rows whose (β, γ, ε) columns match the requested setting."""
    mask = pd.Series(True, index=df.index)
    for col, value in zip(cols, (beta, gamma, eps)):
        if col in df:
            mask &= _near(df[col].astype(float), value)
    return df[mask]


def _hits(g: pd.DataFrame) -> list[str]:
    """One per-image hit string per replicate row (in a stable order), or [] if none recorded."""
    if "hits" not in g:
        return []
    keys = [c for c in ("seed", "run", "trial_id") if c in g]
    return [h for h in g.sort_values(keys)["hits"].tolist() if isinstance(h, str) and h]


def cell_stats(g: pd.DataFrame) -> dict:
    """Pooled accuracy and agreement (%), n, replicates, and the bootstrap half-width of one cell."""
    n = g["n"].sum()
    bs = bootstrap(_hits(g))
    agree = 100 * g["agree"].sum() / n if "agree" in g and g["agree"].notna().any() and n else None
    return {"acc": 100 * g["correct"].sum() / n if n else None, "agree": agree, "n": int(g["n"].max()),
            "reps": len(g), "hw": None if bs is None else 50 * (bs["hi"] - bs["lo"])}


def cells(df: pd.DataFrame, by: list[str]) -> dict:
    """cell_stats per group of `by` (groups with no images are dropped)."""
    return {k: cell_stats(g) for k, g in df.groupby(by, dropna=True, sort=False) if g["n"].sum() > 0}


def table1_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows Table 1 describes and their source: pipeline runs when any exist, else sweep
    trials at the paper's β = γ = 0.5, ε = 8/255 (pooling other settings would mix them)."""
    sweep = is_sweep(df)
    if (~sweep).any():
        return df[~sweep], "pipeline runs"
    return at_setting(df[sweep], 0.5, 0.5, 8 / 255), "sweep trials at β=γ=0.5, ε=8/255"


CHECK_MARK = ("X", "a sanity check of the row failed (`check_failures`): the attack, not the defense, is broken "
                   "there; the number measures no robustness")


def _failed_checks(g) -> bool:
    return "checks_ok" in g and bool((g["checks_ok"].astype("boolean") == False).fillna(False).any())  # noqa: E712


def codes(df, by: list[str]) -> dict:
    """The letters of each group of `by`: X where a row failed a sanity check, then those of the indicators
    of attack failure any of its rows fired (kdp.indicators)."""
    if "indicators" not in df and "checks_ok" not in df:
        return {}
    out = {}
    for key, g in df.groupby(by, sort=False):
        fired = {n for v in (g["indicators"].dropna() if "indicators" in g else []) for n in v.split(",") if n}
        out[key] = CHECK_MARK[0] * _failed_checks(g) + "".join(i.code for n, i in INDICATORS.items() if n in fired)
    return out


def legend(df) -> list[str]:
    """One line per letter used anywhere in `df`: its name and what it means for the number beside it."""
    fired = {n for v in (df["indicators"].dropna() if "indicators" in df else []) for n in v.split(",") if n}
    lines = [f"  {CHECK_MARK[0]} sanity check failed: {CHECK_MARK[1]}"] * _failed_checks(df)
    lines += [f"  {i.code} {n}: {i.meaning}" for n, i in INDICATORS.items() if n in fired]
    if not fired:
        lines.append("  no indicator of attack failure fired")
    return ["\nletters after a number (docs/evaluation.md):"] + lines


def not_same_images(df, threat: str) -> list[str]:
    """A line for each attack of `threat` that ran on fewer images than the others (its numbers
    compare with theirs only on the worst-case row's images)."""
    sub = df[(df.threat_model == threat) & ~df["attack"].isin(CURVE + ("worst-case",))]
    n = sub.groupby("attack")["n"].max()
    if n.empty or n.nunique() == 1:
        return []
    top = n.max()
    return [f"not on the same images: {ATTACK_LABELS.get(a, a)} ran on the first {k} of {top} test images; "
            f"the worst-case row compares all attacks on those {n.min()}" for a, k in n.items() if k < top]


def replicate_key(rows: pd.DataFrame) -> pd.Series:
    """What pairs two variants' rows: the run (pipeline: same run, same seed and images) or the seed
    (sweep trials)."""
    if is_sweep(rows).all() and "sweep.seed" in rows:
        return rows["sweep.seed"].fillna(0).astype(int).astype(str)
    return rows["run"].astype(str)


def versus(rows: pd.DataFrame, variant: str, reference: str, attack: str) -> dict | None:
    """The paired bootstrap (kdp.stats.paired) of `variant` minus `reference` on `attack`'s rows, paired
    by replicate; None when they share no replicate or images."""
    key = rows.assign(_rep=replicate_key(rows))
    mine = key[(key["variant"] == variant) & (key["attack"] == attack)].groupby("_rep")["hits"].first()
    ref = key[(key["variant"] == reference) & (key["attack"] == attack)].groupby("_rep")["hits"].first()
    common = sorted(set(mine.index) & set(ref.index))
    return paired([mine[k] for k in common], [ref[k] for k in common]) if common else None
