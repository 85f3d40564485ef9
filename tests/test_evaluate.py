"""Evaluation: sharding covers the test set and sums to one run; the three threat models;
sanity checks pass on a sound setup and fire on deliberately broken ones."""
import pytest
import torch
import torch.nn as nn

from kdp.checkpoint import save_checkpoint
from kdp.config import EvalConfig, Runtime
from kdp.baselines.jpeg import JpegPurifier
from kdp.models import CifarResNet, ConvAutoencoder, Purified, freeze
from kdp.stages.evaluate import Context, evaluate, evaluate_models, finalize
from kdp.stages.shards import merge_rows, shards

RT = Runtime(device="cpu", progress=False)
QUIET = lambda *_: None  # noqa: E731


def test_shards_cover_every_attack_and_image_once():
    cfg = EvalConfig(attacks=("pgd8", "fgsm"), adaptive_attacks=("pgd8",), transfer_attacks=("fgsm",), batch_size=32,
                     eps_curve=(255,), indicator_subset=40)
    work = shards(cfg, 100, shard_size=40)  # rounded up to 64 = 2 batches
    assert {(t, a) for t, a, _, _ in work} == {("classifier", "clean"), ("classifier", "pgd8"),
                                               ("classifier", "fgsm"), ("full", "pgd8"), ("transfer", "fgsm"),
                                               ("full", "pgd20-eps255")}
    assert [(s, e) for t, a, s, e in work if a == "pgd20-eps255"] == [(0, 40)]  # the first indicator_subset images
    for key in {(t, a) for t, a, _, _ in work} - {("full", "pgd20-eps255")}:
        spans = sorted((s, e) for t, a, s, e in work if (t, a) == key)
        assert spans == [(0, 64), (64, 100)]
    assert not [w for w in shards(cfg, 100, 40, surrogate=False) if w[0] == "transfer"]


def _raw(**kw):
    row = {"variant": "none", "attack": "pgd8", "threat_model": "classifier", "n": 10, "correct": 3, "agree": 4,
           "seconds": 1.0, "attack_seconds": 0.5, "linf_max": 0.01, "accuracy": 0.3, "agreement": 0.4,
           "check.eval_mode": True, "check.in_range": True, "check.src_correct": 8, "check.src_fooled": 7,
           "check.grad_norm": None, "attack.grad": None, "attack.eot": None}
    return {**row, **kw}


def test_merge_rows_sums_counts_and_finalize_derives_checks_from_the_sums():
    a = _raw()
    b = _raw(n=30, correct=6, agree=3, linf_max=0.03, **{"check.src_correct": 22, "check.src_fooled": 3})
    (m,) = finalize(merge_rows([a, b]), EvalConfig(min_attack_success=0.5), QUIET)
    assert (m["n"], m["correct"], m["agree"]) == (40, 9, 7)
    assert m["accuracy"] == pytest.approx(9 / 40) and m["linf_max"] == 0.03 and m["seconds"] == 2.0
    # 10 of 30 fooled: each shard alone would pass (7/8) or fail (3/22); pooled, it fails
    assert m["check.attack_success"] == pytest.approx(10 / 30) and m["check.attack_ok"] is False
    assert m["checks_ok"] is False and m["check_failures"] == "attack_ok"


def test_finalize_flags_linf_and_range_violations_and_logs_a_warning():
    lines = []
    rows = finalize([_raw(linf_max=8 / 255 + 1e-3), _raw(attack="fgsm", **{"check.in_range": False}),
                     _raw(attack="cw", linf_max=0.5), _raw(attack="clean", linf_max=0.0,
                                                          **{"check.src_correct": None, "check.src_fooled": None})],
                    EvalConfig(), lines.append)
    assert [r["check.linf_ok"] for r in rows] == [False, False, True, True]  # CW is L2: no L-inf budget
    assert rows[3]["check.attack_ok"] is None and rows[3]["checks_ok"] is True
    assert len(lines) == 2 and all("WARNING" in s and "linf_ok" in s for s in lines)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    clf = save_checkpoint(d / "clf", CifarResNet(depth=8, width=4).eval(),
                          {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}, {})
    torch.manual_seed(1)
    sur = save_checkpoint(d / "sur", CifarResNet(depth=8, width=4).eval(),
                          {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}, {})
    pur = save_checkpoint(d / "pur", ConvAutoencoder(depth=2, width=4).eval(),
                          {"kind": "purifier", "name": "cae", "kwargs": {"depth": 2, "width": 4}}, {})
    jpeg = save_checkpoint(d / "jpeg", JpegPurifier(50), {"kind": "purifier", "name": "jpeg",
                                                         "kwargs": {"quality": 50}}, {})
    return clf, sur, {"none": None, "cae": pur, "jpeg": jpeg}


def test_sharded_evaluation_equals_one_run(ckpts, tiny_data):
    clf, sur, variants = ckpts
    cfg = EvalConfig(attacks=("pgd8",), adaptive_attacks=("fgsm",), transfer_attacks=("fgsm",), batch_size=16,
                     eps_curve=(255,), indicator_subset=16)  # the curve shards like the rest
    whole = evaluate(cfg, clf, variants, tiny_data, RT, 0, 48, surrogate_dir=sur, log=QUIET)
    parts = [r for t, a, s, e in shards(cfg, 48, 16)
             for r in evaluate(cfg, clf, variants, tiny_data, RT, s, e, (a,), (t,), sur, log=QUIET)]
    key = lambda r: (r["variant"], r["attack"], r["threat_model"])  # noqa: E731
    merged = {key(r): r for r in finalize(merge_rows(parts), cfg, QUIET)}
    assert set(merged) == {key(r) for r in whole}
    assert {r["threat_model"] for r in whole} == {"classifier", "full", "transfer"}
    fields = ("correct", "agree", "n", "hits", "check.src_correct", "check.src_fooled", "checks_ok", "check_failures")
    for r in whole:
        assert [merged[key(r)][f] for f in fields] == [r[f] for f in fields]
    full = {r["variant"]: r for r in whole if r["threat_model"] == "full"}
    assert full["jpeg"]["attack.grad"] == "bpda" and full["cae"]["attack.grad"] == "exact"
    assert all(r["check.grad_nonzero"] for r in full.values())


def test_subset_attacks_run_on_the_first_images_only(ckpts, tiny_data, monkeypatch):
    """An attack declared `subset` covers test images [0, aa_subset), whole or sharded."""
    import dataclasses

    import kdp.attacks

    monkeypatch.setitem(kdp.attacks.ATTACKS, "fgsm", dataclasses.replace(kdp.attacks.ATTACKS["fgsm"], subset=True))
    clf, sur, variants = ckpts
    cfg = EvalConfig(attacks=("pgd8", "fgsm"), adaptive_attacks=("fgsm",), threat_models=("classifier", "full"),
                     aa_subset=20, batch_size=16, eps_curve=())
    whole = evaluate(cfg, clf, variants, tiny_data, RT, 0, 48, log=QUIET)
    n = {(r["attack"], r["threat_model"]): r["n"] for r in whole}
    assert n == {("clean", "classifier"): 48, ("pgd8", "classifier"): 48, ("fgsm", "classifier"): 20,
                 ("fgsm", "full"): 20}
    assert all(len(r["hits"]) == r["n"] and r["first"] == 0 for r in whole)
    work = shards(cfg, 48, 16)
    assert sorted((s, e) for t, a, s, e in work if a == "fgsm" and t == "full") == [(0, 16), (16, 20)]
    parts = [r for t, a, s, e in work for r in evaluate(cfg, clf, variants, tiny_data, RT, s, e, (a,), (t,), log=QUIET)]
    merged = {(r["variant"], r["attack"], r["threat_model"]): r for r in merge_rows(parts)}
    for r in whole:
        m = merged[(r["variant"], r["attack"], r["threat_model"])]
        assert (m["n"], m["correct"], m["hits"]) == (r["n"], r["correct"], r["hits"])


@pytest.mark.slow
def test_aa_standard_rows_record_settings_and_subset(ckpts, tiny_data):
    clf, _, variants = ckpts
    cfg = EvalConfig(attacks=("aa-standard",), adaptive_attacks=("aa-standard",), threat_models=("classifier", "full"),
                     aa_subset=4, batch_size=8, eps_curve=())
    rows = evaluate(cfg, clf, {"none": None, "cae": variants["cae"]}, tiny_data, RT, 0, 16, log=QUIET)
    aa = [r for r in rows if r["attack"] == "aa-standard"]
    assert len(aa) == 4 and all(r["n"] == 4 and r["attack.steps"] == 100 and r["attack.restarts"] == 1 for r in aa)
    assert all("Square 5000 queries" in r["attack.settings"] for r in aa)
    assert all(r["check.linf_ok"] for r in aa)
    clean = next(r for r in rows if r["attack"] == "clean" and r["variant"] == "none")
    assert clean["n"] == 16 and clean["attack.steps"] == 0


def test_eval_cache_reuses_classifier_and_transfer_aes(ckpts, tiny_data, tmp_path):
    clf, sur, variants = ckpts
    cfg = EvalConfig(attacks=("pgd8",), adaptive_attacks=("fgsm",), transfer_attacks=("fgsm",), batch_size=16,
                     eps_curve=())
    run = lambda: evaluate(cfg, clf, variants, tiny_data, RT, 0, 32, surrogate_dir=sur, log=QUIET,  # noqa: E731
                           cache_dir=tmp_path / "cache")
    first, again = run(), run()
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())  # not the .lock files
    assert len(entries) == 2  # pgd8 on the classifier, fgsm on the surrogate; full AEs are never cached
    key = lambda r: (r["variant"], r["attack"], r["threat_model"])  # noqa: E731
    before = {key(r): r for r in first}
    for r in again:
        assert (r["correct"], r["agree"], r["hits"]) == (before[key(r)]["correct"], before[key(r)]["agree"],
                                                         before[key(r)]["hits"])
        crafted = r["attack"] != "clean" and r["threat_model"] != "full"
        assert r["attack.cached"] is crafted and before[key(r)]["attack.cached"] is False
    other = evaluate(EvalConfig(attacks=("pgd8",), threat_models=("classifier",), batch_size=16, seed=1), clf,
                     variants, tiny_data, RT, 0, 32, log=QUIET, cache_dir=tmp_path / "cache")
    assert not any(r["attack.cached"] for r in other)  # another seed: other AEs, a new entry
    (tmp_path / "cache" / entries[0] / "x_adv.npy").write_bytes(b"corrupt")
    assert {key(r): r["correct"] for r in run()} == {key(r): r["correct"] for r in first}  # re-crafted


class ZeroGrad(torch.autograd.Function):
    """Identity forward, zero backward: a purifier that silently kills the attack's gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


class GradientMasker(nn.Module):
    def forward(self, x):
        return ZeroGrad.apply(x)


def _context(tiny_data, cfg, n=32):
    return Context(cfg, tiny_data.test_x[:n].float() / 255, tiny_data.test_y[:n], torch.device("cpu"), 0)


def test_checks_fire_on_a_gradient_masking_purifier_and_a_train_mode_model(tiny_data):
    torch.manual_seed(0)
    clf = freeze(CifarResNet(depth=8, width=4))
    left_in_train = ConvAutoencoder(depth=2, width=4).train()  # forgot .eval(): BN uses batch statistics
    defenses = {"masked": Purified(GradientMasker(), clf), "train_mode": Purified(left_in_train, clf),
                "none": Purified(nn.Identity(), clf)}
    cfg = EvalConfig(attacks=("fgsm",), adaptive_attacks=("fgsm",), threat_models=("classifier", "full"),
                     batch_size=16, eps_curve=())
    lines = []
    rows = finalize(evaluate_models(_context(tiny_data, cfg), defenses, None, cfg.threat_models, None, QUIET),
                    cfg, lines.append)
    full = {r["variant"]: r for r in rows if r["threat_model"] == "full"}
    assert full["masked"]["check.grad_nonzero"] is False and "grad_nonzero" in full["masked"]["check_failures"]
    assert full["none"]["check.grad_nonzero"] is True and full["none"]["check.eval_mode"] is True
    assert all(r["check.eval_mode"] is False for r in rows if r["variant"] == "train_mode")
    assert all(not r["checks_ok"] for r in rows if r["variant"] == "train_mode")
    assert any("masked" in s and "grad_nonzero" in s for s in lines)
    assert any("train_mode" in s and "eval_mode" in s for s in lines)


def test_attack_check_fires_when_the_source_model_cannot_be_attacked(tiny_data):
    """FGSM on a classifier whose input gradient is zero cannot move: a broken attack, not a strong defense."""
    torch.manual_seed(0)
    clf = freeze(nn.Sequential(GradientMasker(), CifarResNet(depth=8, width=4)))
    cfg = EvalConfig(attacks=("fgsm",), threat_models=("classifier",), batch_size=16)
    rows = finalize(evaluate_models(_context(tiny_data, cfg), {"none": Purified(nn.Identity(), clf)}, None,
                                    cfg.threat_models, None, QUIET), cfg, QUIET)
    (fgsm,) = [r for r in rows if r["attack"] == "fgsm"]
    assert fgsm["check.src_correct"] > 0 and fgsm["check.attack_success"] == 0.0
    assert fgsm["check.attack_ok"] is False and fgsm["check_failures"] == "attack_ok"


def test_soap_like_defense_is_attacked_on_its_own_classifier(tiny_data):
    """A purifier with `own_classifier` gets AEs crafted on that classifier, not the shared one."""
    torch.manual_seed(0)
    shared, own = freeze(CifarResNet(depth=8, width=4)), freeze(CifarResNet(depth=8, width=4))

    class Own(nn.Identity):
        own_classifier = own

    from kdp.stages.evaluate import as_defense

    d = as_defense(Own(), shared)
    assert d.classifier is own and as_defense(nn.Identity(), shared).classifier is shared
    cfg = EvalConfig(attacks=("fgsm",), threat_models=("classifier",), batch_size=16)
    ctx = _context(tiny_data, cfg)
    rows = evaluate_models(ctx, {"soap": d, "none": Purified(nn.Identity(), own)}, None, cfg.threat_models, None, QUIET)
    fg = {r["variant"]: r for r in rows if r["attack"] == "fgsm"}
    assert fg["soap"]["correct"] == fg["none"]["correct"]  # same AEs (crafted on `own`), same classifier


def test_an_edited_attack_setting_misses_the_eval_cache(ckpts, tiny_data, tmp_path, monkeypatch):
    """The key reads every setting from the built attack: the same name with another ε in the
    registry crafts new AEs instead of serving the old ones."""
    import dataclasses
    from functools import partial

    import torchattacks

    import kdp.attacks

    clf, _, _ = ckpts
    cfg = EvalConfig(attacks=("pgd8",), threat_models=("classifier",), batch_size=16)
    run = lambda: evaluate(cfg, clf, {"none": None}, tiny_data, RT, 0, 16, log=QUIET,  # noqa: E731
                           cache_dir=tmp_path / "cache")
    assert not any(r["attack.cached"] for r in run()) and all(r["attack.cached"] for r in run() if r["attack"] != "clean")
    pgd4 = partial(torchattacks.PGD, eps=4 / 255, alpha=2 / 255, steps=20, random_start=True)
    monkeypatch.setitem(kdp.attacks.ATTACKS, "pgd8", dataclasses.replace(kdp.attacks.ATTACKS["pgd8"], factory=pgd4))
    edited = [r for r in run() if r["attack"] == "pgd8"]
    assert not edited[0]["attack.cached"] and "eps=0.0156863" in edited[0]["attack.settings"]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_concurrent_evaluations_craft_a_cache_entry_once(ckpts, tiny_data, tmp_path, monkeypatch):
    """Two evaluations of the same AEs at once: the first crafts under the entry's lock, the
    second waits for it and reads the entry (events, no sleeps)."""
    import importlib
    import threading

    ev = importlib.import_module("kdp.stages.evaluate")  # the package re-exports a function of that name
    cache = importlib.import_module("kdp.stages.eval_cache")

    clf, _, _ = ckpts
    cfg = EvalConfig(attacks=("fgsm",), threat_models=("classifier",), batch_size=16)
    crafting, waiting, go, crafted = threading.Event(), threading.Event(), threading.Event(), []
    real_batches, real_held = ev.attack_batches, cache.held

    def slow_batches(*a, **k):
        for xb in real_batches(*a, **k):
            crafted.append(len(xb))
            crafting.set()
            assert go.wait(60)
            yield xb

    def held(path, who="", timeout_s=None, on_wait=None):
        return real_held(path, who, timeout_s, on_wait=lambda h: waiting.set())

    monkeypatch.setattr(ev, "attack_batches", slow_batches)
    monkeypatch.setattr(cache, "held", held)
    rows = {}

    def run(name):
        rows[name] = evaluate(cfg, clf, {"none": None}, tiny_data, RT, 0, 16, log=QUIET, cache_dir=tmp_path / "c")

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert crafting.wait(60)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    assert waiting.wait(60)  # the second found the entry locked
    go.set()
    first.join(60), second.join(60)
    assert crafted == [16]  # one batch of 16, crafted by the first only
    fgsm = {k: next(r for r in v if r["attack"] == "fgsm") for k, v in rows.items()}
    assert not fgsm["first"]["attack.cached"] and fgsm["second"]["attack.cached"]
    assert fgsm["first"]["hits"] == fgsm["second"]["hits"]


def test_autoattack_takes_the_evaluation_seed():
    """Two seeds give AutoAttack other random starts; the same seed the same AEs."""
    from kdp.attacks import attack_batches, build_attack, describe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    x = torch.rand(4, 3, 32, 32)
    y = model(x).argmax(1)  # every image classified "correctly", so every one is attacked

    def aes(seed):  # torch's generator seeded alike: only AutoAttack's own seed differs
        return torch.cat(list(attack_batches(build_attack("autoattack", model, seed=seed), x, y, 4, 0)))

    assert torch.equal(aes(1), aes(1)) and not torch.equal(aes(1), aes(2))
    assert "seed=2" in describe(build_attack("autoattack", model, seed=2))["attack.settings"]
