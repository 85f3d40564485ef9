"""Stage 3: Table 1 protocol and an end-to-end check.

blind (the paper's protocol): each attack is crafted on the classifier alone, once, and
every purifier variant then purifies the same AEs before the classifier classifies them.
end_to_end (beyond the paper): the attack targets purifier+classifier as one model. The
CAE is deterministic and differentiable, so gradients flow through it exactly.

Rows carry counts (`correct`, `agree`, `n`) so shards over test-set slices can be summed.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from kdp.attacks import attack_batches, build_attack
from kdp.checkpoint import load_checkpoint
from kdp.config import EvalConfig, Runtime
from kdp.data import Cifar, to_float
from kdp.models import Purified, freeze
from kdp.train import resolve_device

THREAT_MODELS = ("blind", "end_to_end")


def load_variants(purifier_dirs: dict[str, Path | None], device) -> dict[str, nn.Module]:
    """variant name -> frozen purifier (nn.Identity for a None path: no defense)."""
    return {name: nn.Identity() if p is None else freeze(load_checkpoint(p, device)[0])
            for name, p in purifier_dirs.items()}


def _row(variant, attack, threat, n, correct, agree, seconds, attack_seconds, linf):
    return {"variant": variant, "attack": attack, "threat_model": threat, "n": n, "correct": correct,
            "agree": agree, "accuracy": correct / max(n, 1), "agreement": agree / max(n, 1),
            "seconds": seconds, "attack_seconds": attack_seconds, "linf_max": linf}


@torch.no_grad()
def _classify(classifier, purifier, x):
    return classifier(purifier(x)).argmax(1)


def _blind(cfg, name, classifier, purifiers, x, y, clean_pred, device, start):
    """One attack crafted on the classifier, scored through every purifier."""
    stats = {v: [0, 0, 0.0] for v in purifiers}  # correct, agree, purify seconds
    t_attack, linf = 0.0, 0.0
    if name == "clean":
        batches = (x[i:i + cfg.batch_size].to(device) for i in range(0, len(x), cfg.batch_size))
    else:
        attack = build_attack(name, classifier)
        batches = attack_batches(attack, x, y, cfg.batch_size, cfg.seed, start, device)
    i, t0 = 0, time.perf_counter()
    for xb in batches:
        t_attack += time.perf_counter() - t0
        sl = slice(i, i + len(xb))
        linf = max(linf, float((xb.cpu() - x[sl]).abs().max()))
        for v, p in purifiers.items():
            t1 = time.perf_counter()
            pred = _classify(classifier, p, xb).cpu()
            stats[v][0] += int((pred == y[sl]).sum())
            stats[v][1] += int((pred == clean_pred[sl]).sum())
            stats[v][2] += time.perf_counter() - t1
        i += len(xb)
        t0 = time.perf_counter()
    return [_row(v, name, "blind", len(x), c, a, t_attack + s, t_attack, linf)
            for v, (c, a, s) in stats.items()]


def _end_to_end(cfg, name, classifier, variant, purifier, x, y, clean_pred, device, start):
    """One attack crafted through purifier+classifier and scored on the same model."""
    model = Purified(purifier, classifier).eval()
    attack = build_attack(name, model)
    correct = agree = 0
    linf, t0, i = 0.0, time.perf_counter(), 0
    for xb in attack_batches(attack, x, y, cfg.batch_size, cfg.seed, start, device):
        sl = slice(i, i + len(xb))
        linf = max(linf, float((xb.cpu() - x[sl]).abs().max()))
        pred = _classify(classifier, purifier, xb).cpu()
        correct += int((pred == y[sl]).sum())
        agree += int((pred == clean_pred[sl]).sum())
        i += len(xb)
    seconds = time.perf_counter() - t0
    return _row(variant, name, "end_to_end", len(x), correct, agree, seconds, seconds, linf)


def evaluate(cfg: EvalConfig, classifier_dir: Path, purifier_dirs: dict[str, Path | None], data: Cifar,
             rt: Runtime = Runtime(), start: int = 0, stop: int | None = None,
             attacks: tuple[str, ...] | None = None, threat_models: tuple[str, ...] = THREAT_MODELS,
             log=print) -> list[dict]:
    """Accuracy rows for every (variant, attack) on test images [start, stop).

    `attacks` / `threat_models` restrict the run (for sharding); 'clean' counts as a blind
    attack. Shards give the same AEs as one run if `start` is a multiple of cfg.batch_size.
    """
    device = resolve_device(rt.device)
    classifier = freeze(load_checkpoint(classifier_dir, device)[0])
    purifiers = load_variants(purifier_dirs, device)
    x, y = to_float(data.test_x[start:stop]), data.test_y[start:stop]
    clean_pred = torch.cat([_classify(classifier, nn.Identity(), x[i:i + 512].to(device)).cpu()
                            for i in range(0, len(x), 512)]) if len(x) else y.clone()
    rows = []
    for name in ("clean",) + cfg.attacks if "blind" in threat_models else ():
        if attacks is None or name in attacks:
            rows += _blind(cfg, name, classifier, purifiers, x, y, clean_pred, device, start)
            log(f"[eval] blind {name:<10} " + " ".join(f"{r['variant']}={r['accuracy']:.3f}" for r in rows[-len(purifiers):]))
    for name in cfg.adaptive_attacks if "end_to_end" in threat_models else ():
        if attacks is None or name in attacks:
            for v, p in purifiers.items():
                if not isinstance(p, nn.Identity):
                    rows.append(_end_to_end(cfg, name, classifier, v, p, x, y, clean_pred, device, start))
                    log(f"[eval] end_to_end {name} {v}={rows[-1]['accuracy']:.3f}")
    return rows


def shards(cfg: EvalConfig, n_test: int, shard_size: int) -> list[tuple[str, str, int, int]]:
    """(threat_model, attack, start, stop) work items covering the evaluation; shard_size
    is rounded up to a multiple of the batch size so that shards reproduce one run's AEs."""
    size = -(-max(shard_size, 1) // cfg.batch_size) * cfg.batch_size
    items = [("blind", a) for a in ("clean",) + cfg.attacks] + [("end_to_end", a) for a in cfg.adaptive_attacks]
    return [(t, a, s, min(s + size, n_test)) for t, a in items for s in range(0, n_test, size)]


def merge_rows(rows: list[dict]) -> list[dict]:
    """Sum shard rows of the same (variant, attack, threat model) into one row each."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["variant"], r["attack"], r["threat_model"])
        if key not in merged:
            merged[key] = dict(r)
            continue
        m = merged[key]
        for k in ("n", "correct", "agree", "seconds", "attack_seconds"):
            m[k] += r[k]
        m["linf_max"] = max(m["linf_max"], r["linf_max"])
    for m in merged.values():
        m["accuracy"], m["agreement"] = m["correct"] / max(m["n"], 1), m["agree"] / max(m["n"], 1)
    return list(merged.values())
