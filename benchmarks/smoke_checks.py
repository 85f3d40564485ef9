"""Accuracy-level checks of a finished smoke run (what the tests' tiny preset is too small
to show): the classifier learned, attacks break the undefended classifier, every attack kept
its L-inf budget, and crafting through the purifier is never weaker than on the classifier.

    make run                                   # writes runs/smoke
    python benchmarks/smoke_checks.py runs/smoke

Prints one line per check and exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdp.attacks import ATTACKS  # noqa: E402
from kdp.results import load  # noqa: E402

VARIANTS = ("none", "at_teacher", "nt_teacher", "kd_at", "kd_nt", "kd_at_nt", "jpeg", "nrp", "soap", "e2e_at",
            "at_classifier")  # those a run has (`demo` leaves the last two out)


def checks(df) -> list[tuple[str, bool]]:
    """(description, passed) for each accuracy-level property of a smoke run's rows."""
    acc = df.set_index(["variant", "attack", "threat_model"])["accuracy"]
    clean = acc[("none", "clean", "classifier")]
    out = [("undefended clean accuracy > 0.3 (chance is 0.1)", clean > 0.3),
           ("classifier.test_acc > 0.3", df["classifier.test_acc"].iloc[0] > 0.3)]
    out += [(f"undefended {a} < half of clean", acc[("none", a, "classifier")] < clean / 2)
            for a in ("pgd8", "bim", "autoattack")]
    out += [(f"{a} within L-inf {eps:.4f}", bool((df[df.attack == a].linf_max <= eps + 1e-6).all()))
            for a, eps in ((a, ATTACKS[a].linf_eps) for a in ATTACKS) if eps is not None and a in set(df.attack)]
    full = df[df.threat_model == "full"].set_index(["variant", "attack"])["attack.grad"]
    for v in (v for v in VARIANTS if v in set(df.variant)):
        out.append((f"{v}: full pgd8 <= classifier pgd8", acc[(v, "pgd8", "full")] <= acc[(v, "pgd8", "classifier")]))
        if full.get((v, "aa-standard")) == "exact":  # through BPDA AutoAttack need not dominate
            out.append((f"{v}: full aa-standard <= classifier aa-standard",
                        acc[(v, "aa-standard", "full")] <= acc[(v, "aa-standard", "classifier")]))
    out.append(("none: full pgd8 == classifier pgd8 (no purifier, the same attack)",
                acc[("none", "pgd8", "full")] == acc[("none", "pgd8", "classifier")]))
    out.append(("kd_at_nt: full pgd8 < half of classifier pgd8",
                acc[("kd_at_nt", "pgd8", "full")] < acc[("kd_at_nt", "pgd8", "classifier")] / 2))
    said = df[df["attack.same_as"].notna()] if "attack.same_as" in df else df.iloc[:0]
    if "at_classifier" in set(df.variant):
        hits = df.set_index(["variant", "attack", "threat_model"])["hits"]
        out.append(("at_classifier: each full row said once is its classifier row (no purifier, the same attack)",
                    len(said) > 0 and all(hits[(r.variant, r.attack, "classifier")] == r.hits for r in said.itertuples())))
    undefended = df[(df.variant == "none") & (df.threat_model == "classifier") & df.attack.isin(["pgd8", "bim"])]
    out.append(("undefended pgd8, bim: attack success > 0.9 and checks ok",
                (undefended["check.attack_success"] > 0.9).all() and undefended["checks_ok"].all()))
    return [(what, bool(ok)) for what, ok in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished smoke run directory (or its results.parquet)")
    args = p.parse_args(argv)
    path = Path(args.run)
    df = load(path / "results.parquet" if path.is_dir() else path)
    results = checks(df)
    for what, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    failed = sum(not ok for _, ok in results)
    print(f"{len(results) - failed}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
