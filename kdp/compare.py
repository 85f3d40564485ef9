"""The comparison the field asks of a test-time defense (Croce et al. 2022): does it beat plain
adversarial training of the classifier (`at_classifier`), under each threat model, beyond noise,
and what clean accuracy does it pay? And at what training budget, each stated the same way.

Robust accuracy is each threat model's worst case (an image counts only if it is correct clean
and under every attack of that suite, kdp.indicators), paired with `at_classifier`'s on the same
images and replicates (kdp.cells.versus: the paired bootstrap Table 2 uses).
"""
from __future__ import annotations

import pandas as pd

from kdp.cells import VARIANT_LABELS, VARIANT_ORDER, cells, ordered, table1_rows, versus
from kdp.config import THREAT_MODELS, ThreatModel
from kdp.indicators import WORST

REFERENCE = "at_classifier"


def _first(df: pd.DataFrame, col: str):
    vals = df[col].dropna() if col in df else pd.Series(dtype=object)
    return vals.iloc[0] if len(vals) else None


def budget_line(df: pd.DataFrame) -> str | None:
    """The training budgets, in forward-backward passes per training image, from the rows' configs:
    the AT classifier's against the purifier pipeline's (classifier, training AEs, CAE epochs) and
    e2e_at's. None when the rows carry no at_classifier config."""
    epochs, steps = _first(df, f"{REFERENCE}.epochs"), _first(df, f"{REFERENCE}.steps")
    if epochs is None or steps is None or REFERENCE not in set(df["variant"]):
        return None
    clf, ae = _first(df, "classifier.epochs"), _first(df, "ae.steps")
    teachers = [_first(df, f"{k}_teacher.epochs") for k in ("at", "nt")]
    students = df[df["variant"].astype(str).str.startswith("kd_")].groupby("variant")["purifier.epochs"].first() \
        if "purifier.epochs" in df else pd.Series(dtype=float)
    line = (f"Training budget (forward-backward passes per training image): `at_classifier` {int(epochs)} epochs × "
            f"(PGD-{int(steps)} + 1 update) = {int(epochs) * (int(steps) + 1)} passes of its "
            f"{_first(df, f'{REFERENCE}.arch')}; the purifier pipeline: the classifier's {clf} epochs + "
            f"{ae} PGD steps for the training AEs (once) = {int(clf or 0) + int(ae or 0)} passes of the classifier, "
            f"then {' + '.join(str(int(t)) for t in teachers if t is not None)} teacher and "
            f"{' + '.join(str(int(s)) for s in students) or 0} student epochs of the CAE (AT teacher and students "
            "also through the classifier)")
    e_epochs, e_steps = _first(df, "e2e_at.epochs"), _first(df, "e2e_at.steps")
    if e_epochs is not None and "e2e_at" in set(df["variant"]):
        line += (f"; `e2e_at` {int(e_epochs)} epochs × (PGD-{int(e_steps)} + 1) = "
                 f"{int(e_epochs) * (int(e_steps) + 1)} passes of CAE∘classifier")
    return line + "."


def _mark(test: dict | None) -> str:
    if test is None:
        return ""
    return (" ▲" if test["diff"] > 0 else " ▼") if test["differs"] else " ≈"


def _cell(stats: dict, rows: pd.DataFrame, v: str, threat: str, attack: str) -> str:
    c = stats.get((threat, attack, v))
    if c is None or c.get("acc") is None:
        return "–"
    mark = "" if v == REFERENCE else _mark(versus(rows[rows["threat_model"] == threat], v, REFERENCE, attack))
    hw = f" ± {c['hw']:.2f}" if c.get("hw") is not None else ""
    return f"{c['acc']:.2f}{hw}{mark}"


def reference_markdown(df: pd.DataFrame) -> str:
    """Each defense against `at_classifier`: clean accuracy, and the worst case of each threat model,
    marked ▲/▼ where the paired 95% bootstrap interval of the difference excludes 0, ≈ where it does not."""
    sub, source = table1_rows(df)
    if sub.empty or REFERENCE not in set(sub["variant"]):
        return (f"_No `{REFERENCE}` rows: run with it among `baselines` (on by default) to compare every defense "
                "with adversarial training._")
    threats = [t for t in THREAT_MODELS if ((sub["threat_model"] == t) & (sub["attack"] == WORST)).any()]
    keys = [(ThreatModel.CLASSIFIER, "clean")] + [(t, WORST) for t in threats]
    stats = cells(sub[sub["attack"].isin(("clean", WORST))], ["threat_model", "attack", "variant"])
    variants = ordered(sub["variant"].dropna(), VARIANT_ORDER)  # `none` first: the static base
    body = [[VARIANT_LABELS.get(v, v)] + [_cell(stats, sub, v, t, a) for t, a in keys] for v in variants]
    header = ["defense", "clean"] + [f"{t} worst case" for t in threats]
    caption = (f"Against adversarial training ({source}), with the undefended classifier (the static base) first: "
               "accuracy (%) ± half its 95% bootstrap interval; robust "
               "accuracy is each threat model's worst case over its whole suite. ▲/▼: above/below "
               f"`{REFERENCE}` beyond noise (the 95% paired bootstrap interval of the difference, same replicates "
               "and images, excludes 0); ≈: not distinguishable at this n. For `at_classifier` (no purifier) the "
               "`classifier` and `full` threat models are one attack on one model: its `full` rows repeat its "
               "`classifier` rows where the suites share an attack (`attack.same_as`), and its `full` worst case "
               "counts every attack of both suites.")
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    budget = budget_line(sub)
    return "\n".join(lines + ([""] + [budget] if budget else []))
