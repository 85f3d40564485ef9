"""Indicators of attack failure, one boolean column each (`indicator.<name>`: True = fired, None = does
not apply to the row), and the field's robust accuracy, the worst case per image over a suite.

Each indicator is one `Indicator` record in INDICATORS; the schema's columns, the tables' marks and
legend and the report's section come from it. The per-row ones read the `trace.*` counts that
kdp.trace took during the attack; the others compare rows of the same variant on the images both
ran on (per-image `hits`), so they cost nothing beyond the rows themselves (Pintor et al. 2022,
"Indicators of Attack Failure"; Croce & Hein 2020's AutoAttack flags). docs/evaluation.md: costs.
`conclude` is the evaluation's last step, on the merged rows of all shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kdp.attacks import ATTACKS, BLACKBOX
from kdp.config import ThreatModel

WORST = "worst-case"  # the attack name of the robust-accuracy rows


@dataclass(frozen=True)
class Indicator:
    """One indicator of attack failure, declared once (in INDICATORS below)."""
    name: str
    """Its column, `indicator.<name>`."""
    code: str
    """The letter that marks a cell of a row that fired it, in every table."""
    meaning: str
    """What a fired one says about the number beside it (the tables' legend)."""
    rule: Callable[[dict, "Rows"], tuple[bool | None, str]]
    """(row, all rows) -> (fired, or None where it does not apply; a note with the counts)."""


class Rows:
    """The evaluation's merged rows, by (variant, threat model) and attack."""

    def __init__(self, rows: list[dict]):
        self.by: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            self.by.setdefault((r["variant"], r["threat_model"]), {})[r["attack"]] = r

    def of(self, variant: str, threat: str) -> dict[str, dict]:
        return self.by.get((variant, threat), {})


def span(*rows: dict) -> tuple[int, int]:
    """[lo, hi): the test images every one of `rows` ran on."""
    lo = max(r["first"] or 0 for r in rows)
    return lo, min((r["first"] or 0) + r["n"] for r in rows)


def bits(r: dict, lo: int, hi: int) -> str:
    """Row r's per-image correctness ('0'/'1') on test images [lo, hi)."""
    first = r["first"] or 0
    return (r.get("hits") or "")[lo - first:hi - first]


def on_same(a: dict, b: dict) -> tuple[int, int, int] | None:
    """(correct of a, correct of b, images) on the images both ran on; None: none shared or no hits."""
    lo, hi = span(a, b)
    ba, bb = bits(a, lo, hi), bits(b, lo, hi)
    if hi <= lo or len(ba) != hi - lo or len(bb) != hi - lo:
        return None
    return ba.count("1"), bb.count("1"), hi - lo


def _count(key: str, text: str, when: Callable[[dict], bool] = lambda r: True):
    def rule(r: dict, rows: Rows):
        v = r.get(key)
        if v is None or not when(r):
            return None, ""
        return v > 0, f"{v} {text}" if v else ""
    return rule


def _unstable(r: dict, rows: Rows):
    if r["threat_model"] != ThreatModel.FULL or r.get("trace.probe_images") is None:
        return None, ""
    random_ = (r["trace.unstable"] or 0) > 0 and (r.get("attack.eot") or 1) == 1
    jumpy = (r["trace.jumpy"] or 0) > 0 and r.get("attack.grad") == "exact"
    n = r["trace.probe_images"]
    note = "; ".join([f"{r['trace.unstable']}/{n} images changed between two identical passes (no EOT)"] * random_
                     + [f"{r['trace.jumpy']}/{n} images' loss jumped under noise of ε/64 (exact gradients)"] * jumpy)
    return random_ or jumpy, note


def _transfer(r: dict, rows: Rows):
    eps = ATTACKS[r["attack"]].linf_eps if r["attack"] in ATTACKS else None
    if r["threat_model"] != ThreatModel.FULL or eps is None:
        return None, ""
    worse = []
    for threat in (ThreatModel.CLASSIFIER, ThreatModel.TRANSFER):
        for name, o in rows.of(r["variant"], threat).items():
            same = on_same(r, o) if name in ATTACKS and ATTACKS[name].linf_eps == eps else None
            if same and same[1] < same[0]:
                worse.append(f"{threat} {name} left {same[1]}/{same[2]}, full {r['attack']} {same[0]}/{same[2]}")
    return bool(worse), "; ".join(worse)


def _unbounded(r: dict, rows: Rows):
    if r["threat_model"] != ThreatModel.FULL or r["attack"] == WORST:
        return None, ""
    big = [o for a, o in rows.of(r["variant"], ThreatModel.FULL).items()
           if a in ATTACKS and (ATTACKS[a].linf_eps or 0) >= 1]
    if not big:
        return None, ""
    left = big[0]["correct"]
    return left > 0, f"unbounded {big[0]['attack']} left {left}/{big[0]['n']} images correct" if left else ""


def _blackbox(r: dict, rows: Rows):
    v = r.get("trace.blackbox_only")
    return (None, "") if v is None else (v > 0, f"{v} images fooled only by {'/'.join(BLACKBOX)}" if v else "")


def _stronger(r: dict, rows: Rows):
    a = ATTACKS.get(r["attack"])
    weaker = [(n, rows.of(r["variant"], r["threat_model"]).get(n)) for n in (a.dominates if a else ())]
    same = [(n, on_same(r, o)) for n, o in weaker if o is not None]
    same = [(n, s) for n, s in same if s is not None]
    if not same:
        return None, ""
    worse = [f"{n} left {s[1]}/{s[2]}, {r['attack']} {s[0]}/{s[2]}" for n, s in same if s[0] > s[1]]
    return bool(worse), "; ".join(worse)


def _iterates(kind: str | None):
    return lambda r: r["attack"] in ATTACKS and ATTACKS[r["attack"]].iterates is not None and (
        kind is None or ATTACKS[r["attack"]].iterates == kind)


INDICATORS: dict[str, Indicator] = {i.name: i for i in (
    Indicator("unavailable_gradients", "G", "some image's input gradient through the attacked model is zero or not "
              "finite: a gradient attack cannot move there, so the number is an upper bound (use BPDA or another "
              "attack)", _count("trace.zero_grad", "images with a zero or non-finite input gradient")),
    Indicator("unstable_predictions", "R", "the defense's output changes between identical passes, or its loss jumps "
              "under noise far below ε, and the attack did not average (EOT) or approximate (BPDA) it: the number "
              "may be too high", _unstable),
    Indicator("silent_success", "S", "an iterate of the attack was adversarial but its returned point was not; kdp "
              "scored the best iterate instead (the number is already corrected), the attack itself is defective",
              _count("trace.silent", "images had an adversarial iterate the attack did not return", _iterates(None))),
    Indicator("incomplete_optimization", "I", "on images the attack failed on, its loss was still rising over its "
              "last 10% of steps: more steps would likely lower the number",
              _count("trace.incomplete", "failed images whose loss still rose at the end", _iterates("ce"))),
    Indicator("transfer_beats_whitebox", "T", "AEs of another threat model at the same ε (crafted without the "
              "defense) fool more images than the full white-box attack: the white-box attack is weak here, the "
              "number too high", _transfer),
    Indicator("unbounded_attack_failure", "U", "PGD with an unbounded ε still leaves images correct through this "
              "defense: the attack cannot reach what must be reachable, so every full-threat number of this "
              "defense is suspect", _unbounded),
    Indicator("blackbox_beats_whitebox", "B", "the black-box piece (Square) fooled images the gradient pieces "
              "could not: a sign of masked gradients", _blackbox),
    Indicator("stronger_attack_weaker", "W", "an attack that dominates another (more steps, larger ε, full "
              "strength) leaves more images correct on the same images: under `full` it is failing; under "
              "`classifier` or `transfer`, whose AEs are crafted on another model, the purifier undoes its AEs "
              "more often than the weaker attack's, so the weaker attack's lower number is the one to trust",
              _stronger),
)}


def indicate(rows: list[dict], log=print) -> list[dict]:
    """Set every row's `indicator.*`, `indicators` (the fired ones) and `indicator_notes` columns, and
    say each fired one in the log."""
    index, said = Rows(rows), {}
    for r in rows:
        fired, notes = [], []
        for ind in INDICATORS.values():
            on, note = ind.rule(r, index)
            r[f"indicator.{ind.name}"] = on
            if on:
                fired.append(ind.name)
                notes.append(f"{ind.name}: {note}")
        r["indicators"], r["indicator_notes"] = ",".join(fired), "; ".join(notes)
        if fired:  # AEs crafted once fire alike for every variant: one line for them all
            said.setdefault((r["threat_model"], r["attack"], r["indicator_notes"]), []).append(r["variant"])
    for (threat, attack, notes), variants in said.items():
        log(f"[eval] INDICATOR {threat} {attack} on {', '.join(variants)}: {notes}")
    return rows


def worst_case(rows: list[dict], suites: dict[str, tuple[str, ...]]) -> list[dict]:
    """Per (variant, threat model): an image counts as correct only if it is correct on clean images and
    under every attack of that threat model's suite, on the images all of them ran on (AutoAttack's
    robust accuracy); under `full`, a defense that is its own classifier counts its `classifier` attacks too.
    Its indicators are those fired by any row it is made of."""
    index, out = Rows(rows), []
    for (variant, threat), by_attack in index.by.items():
        parts = [by_attack[a] for a in suites.get(threat, ()) if a in by_attack and a != "clean"]
        if threat == ThreatModel.FULL and any(r.get("attack.same_as") for r in by_attack.values()):
            # its own classifier (at_classifier): every attack crafted on it is white-box, `classifier`'s too
            parts += [r for a, r in index.of(variant, ThreatModel.CLASSIFIER).items()
                      if a in suites.get(ThreatModel.CLASSIFIER, ()) and a not in by_attack and a != "clean"]
        clean = index.of(variant, ThreatModel.CLASSIFIER).get("clean")
        if not parts:
            continue
        parts = ([clean] if clean is not None else []) + parts
        lo, hi = span(*parts)
        cols = [bits(r, lo, hi) for r in parts]
        if hi <= lo or any(len(c) != hi - lo for c in cols):
            continue
        hits = "".join("1" if all(c[i] == "1" for c in cols) else "0" for i in range(hi - lo))
        out.append(_worst_row(variant, threat, parts, lo, hits))
    return out


def _worst_row(variant: str, threat: str, parts: list[dict], lo: int, hits: str) -> dict:
    n = len(hits)
    fired = {ind.name: any(p.get(f"indicator.{ind.name}") for p in parts) for ind in INDICATORS.values()}
    applies = {ind.name: any(p.get(f"indicator.{ind.name}") is not None for p in parts) for ind in INDICATORS.values()}
    names = [k for k, v in fired.items() if v]
    return {"variant": variant, "attack": WORST, "threat_model": threat, "n": n, "correct": hits.count("1"),
            "accuracy": hits.count("1") / max(n, 1), "first": lo, "hits": hits,
            "attack.settings": f"per image, correct under all of: {', '.join(p['attack'] for p in parts)} "
                               f"(test images {lo}..{lo + n - 1})",
            "linf_max": max(p["linf_max"] or 0 for p in parts if p["attack"] != "clean"),
            **{k: all(p.get(k) is not False for p in parts) for k in ("check.eval_mode", "check.linf_ok", "checks_ok")},
            "check_failures": ",".join(sorted({f for p in parts for f in (p.get("check_failures") or "").split(",")
                                               if f})),
            **{f"indicator.{k}": (fired[k] if applies[k] else None) for k in fired},
            "indicators": ",".join(names),
            "indicator_notes": "; ".join(f"{k}: from {', '.join(p['attack'] for p in parts if p.get(f'indicator.{k}'))}"
                                         for k in names)}


def conclude(rows: list[dict], suites: dict[str, tuple[str, ...]], log=print) -> list[dict]:
    """The evaluation's last step on its merged, checked rows: the indicators, then the worst-case rows."""
    rows = indicate(rows, log)
    return rows + worst_case(rows, suites)
