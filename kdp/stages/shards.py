"""How an evaluation is split and put back together: shards over (threat model, attack, test slice),
and their raw rows summed into one row per (variant, attack, threat model)."""
from __future__ import annotations

from kdp.config import EvalConfig, ThreatModel
from kdp.trace import PROBE_KEYS, TRACE_KEYS


def shards(cfg: EvalConfig, n_test: int, shard_size: int, surrogate: bool = True) -> list[tuple[str, str, int, int]]:
    """(threat_model, attack, start, stop) work items covering the evaluation; shard_size
    is rounded up to a multiple of the batch size so that shards reproduce one run's AEs."""
    size = -(-max(shard_size, 1) // cfg.batch_size) * cfg.batch_size
    items = [(t, a) for t in cfg.threat_models if surrogate or t != ThreatModel.TRANSFER for a in cfg.runs(t)]
    return [(t, a, s, min(s + size, cfg.subset(a, n_test))) for t, a in items
            for s in range(0, cfg.subset(a, n_test), size)]


_SUMS = ("n", "correct", "agree", "seconds", "attack_seconds", "check.src_correct", "check.src_fooled",
         *TRACE_KEYS, *PROBE_KEYS)


def _merge_into(m: dict, r: dict) -> None:
    for k in _SUMS:
        a, b = m.get(k), r.get(k)
        m[k] = None if a is None and b is None else (a or 0) + (b or 0)
    m["linf_max"] = max(m["linf_max"], r["linf_max"])
    m["hits"] = (m.get("hits") or "") + (r.get("hits") or "")
    m["attack.cached"] = bool(m.get("attack.cached")) and bool(r.get("attack.cached"))
    m["check.eval_mode"] = m["check.eval_mode"] and r["check.eval_mode"]
    m["check.in_range"] = m["check.in_range"] and r["check.in_range"]
    norms = [v for v in (m["check.grad_norm"], r["check.grad_norm"]) if v is not None]
    m["check.grad_norm"] = min(norms) if norms else None


def merge_rows(rows: list[dict]) -> list[dict]:
    """Sum shard rows of the same (variant, attack, threat model) into one row each, their
    per-image `hits` joined in test-set order; run `finalize` on the result to re-derive the
    checks from the summed counts."""
    merged: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r.get("first") or 0):
        key = (r["variant"], r["attack"], r["threat_model"])
        if key in merged:
            _merge_into(merged[key], r)
        else:
            merged[key] = dict(r)
    for m in merged.values():
        m["accuracy"], m["agreement"] = m["correct"] / max(m["n"], 1), m["agree"] / max(m["n"], 1)
    return list(merged.values())
