"""Evaluation sharding: work items cover the test set, and summed shards equal one run."""
import pytest

from kdp.checkpoint import save_checkpoint
from kdp.config import EvalConfig, Runtime
from kdp.models import CifarResNet, ConvAutoencoder
from kdp.stages.evaluate import evaluate, merge_rows, shards


def test_shards_cover_every_attack_and_image_once():
    cfg = EvalConfig(attacks=("pgd8", "fgsm"), adaptive_attacks=("pgd8",), batch_size=32)
    work = shards(cfg, 100, shard_size=40)  # rounded up to 64 = 2 batches
    assert {(t, a) for t, a, _, _ in work} == {("blind", "clean"), ("blind", "pgd8"), ("blind", "fgsm"),
                                               ("end_to_end", "pgd8")}
    for key in {(t, a) for t, a, _, _ in work}:
        spans = sorted((s, e) for t, a, s, e in work if (t, a) == key)
        assert spans == [(0, 64), (64, 100)]


def test_merge_rows_sums_counts_and_recomputes_accuracy():
    a = {"variant": "none", "attack": "pgd8", "threat_model": "blind", "n": 10, "correct": 3, "agree": 4,
         "seconds": 1.0, "attack_seconds": 0.5, "linf_max": 0.01, "accuracy": 0.3, "agreement": 0.4}
    b = dict(a, n=30, correct=6, agree=3, linf_max=0.03)
    (m,) = merge_rows([a, b])
    assert (m["n"], m["correct"], m["agree"]) == (40, 9, 7)
    assert m["accuracy"] == pytest.approx(9 / 40) and m["linf_max"] == 0.03 and m["seconds"] == 2.0


def test_sharded_evaluation_equals_one_run(tmp_path, tiny_data):
    clf = save_checkpoint(tmp_path / "clf", CifarResNet(depth=8, width=4).eval(),
                          {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}, {})
    pur = save_checkpoint(tmp_path / "pur", ConvAutoencoder(depth=2, width=4).eval(),
                          {"kind": "purifier", "name": "cae", "kwargs": {"depth": 2, "width": 4}}, {})
    cfg = EvalConfig(attacks=("pgd8",), adaptive_attacks=("fgsm",), batch_size=16)
    variants = {"none": None, "cae": pur}
    rt = Runtime(device="cpu", progress=False)
    quiet = lambda *_: None  # noqa: E731
    whole = evaluate(cfg, clf, variants, tiny_data, rt, 0, 48, log=quiet)
    parts = [r for t, a, s, e in shards(cfg, 48, 16)
             for r in evaluate(cfg, clf, variants, tiny_data, rt, s, e, (a,), (t,), log=quiet)]
    key = lambda r: (r["variant"], r["attack"], r["threat_model"])  # noqa: E731
    merged = {key(r): r for r in merge_rows(parts)}
    assert set(merged) == {key(r) for r in whole}
    for r in whole:
        assert (merged[key(r)]["correct"], merged[key(r)]["agree"], merged[key(r)]["n"]) == \
               (r["correct"], r["agree"], r["n"])
