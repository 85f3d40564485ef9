"""kdp.stages.aes: the training-AE cache (keying, reuse, crash safety, concurrent makers)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import kdp.stages.aes as aes
from conftest import wait_until
from kdp.checkpoint import save_checkpoint
from kdp.config import AEConfig, Runtime
from kdp.data import load_cifar, to_float
from kdp.models import build_model, freeze
from kdp.stages.aes import AES, META, ae_cache_key, load_training_aes, make_training_aes

REPO = Path(__file__).resolve().parents[1]
SPEC = {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}
CFG = AEConfig(steps=2, batch_size=32)
RT = Runtime(device="cpu", progress=False)
N_TRAIN = 64


def save_classifier(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(SPEC["kind"], SPEC["name"], **SPEC["kwargs"]), SPEC, {"seed": seed})


@pytest.fixture(scope="module")
def data(cifar_subset_dir):
    return load_cifar(cifar_subset_dir, n_train=N_TRAIN, n_test=8)


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("clf") / "classifier", seed=0)


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_make_training_aes_creates_entry(tmp_path, data, clf_dir):
    cache = tmp_path / "cache"
    entry = make_training_aes(CFG, clf_dir, data, cache, RT)
    assert entry.parent == cache and entry.name == ae_cache_key(CFG, clf_dir, data)
    assert len(entry.name) == 20
    assert listing(entry) == sorted([AES, META]) and listing(cache) == [entry.name]
    arr = np.load(entry / AES, allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (N_TRAIN, 3, 32, 32)
    x = to_float(data.train_x).numpy()
    linf = np.abs(arr - x).max()
    assert linf <= CFG.eps + 1e-6
    assert linf >= CFG.eps - 1e-6  # random start + 2 steps of 2/255 reach the 8/255 boundary
    assert arr.min() >= 0 and arr.max() <= 1
    assert torch.equal(load_training_aes(entry), torch.from_numpy(arr))
    meta = json.loads((entry / META).read_text())
    assert meta["n"] == N_TRAIN and meta["config"]["eps"] == pytest.approx(CFG.eps)
    assert meta["data_sha256"] == data.fingerprint()
    assert meta["linf_max"] == pytest.approx(float(linf), abs=1e-6)
    # the AEs are the attack's: crafting directly gives the same tensor
    clf = freeze(build_model(SPEC["kind"], SPEC["name"], **SPEC["kwargs"]))
    clf.load_state_dict(torch.load(clf_dir / "model.pt", weights_only=True))
    direct = aes.craft(CFG, clf, to_float(data.train_x), data.train_y, torch.device("cpu"))
    assert torch.equal(direct, torch.from_numpy(arr))


def test_second_call_reuses_entry(tmp_path, data, clf_dir, monkeypatch):
    cache = tmp_path / "cache"
    entry = make_training_aes(CFG, clf_dir, data, cache, RT)
    before = (entry / AES).stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("craft must not run on a cache hit")

    monkeypatch.setattr(aes, "craft", boom)
    assert make_training_aes(CFG, clf_dir, data, cache, RT) == entry
    assert make_training_aes(AEConfig(steps=2, batch_size=32), clf_dir, data, cache, RT) == entry
    assert (entry / AES).stat().st_mtime_ns == before
    # an unrelated config is a miss and does reach craft
    with pytest.raises(AssertionError, match="must not run"):
        make_training_aes(AEConfig(steps=3, batch_size=32), clf_dir, data, cache, RT)


def test_key_depends_on_everything_the_aes_depend_on(tmp_path, data, clf_dir):
    base = ae_cache_key(CFG, clf_dir, data)
    assert ae_cache_key(AEConfig(steps=2, batch_size=32), clf_dir, data) == base
    assert ae_cache_key(AEConfig(steps=2, batch_size=32, eps=4 / 255), clf_dir, data) != base
    assert ae_cache_key(AEConfig(steps=3, batch_size=32), clf_dir, data) != base
    assert ae_cache_key(AEConfig(steps=2, batch_size=32, seed=1), clf_dir, data) != base
    assert ae_cache_key(AEConfig(steps=2, batch_size=16), clf_dir, data) != base  # see the next test
    other = save_classifier(tmp_path / "other", seed=1)
    assert ae_cache_key(CFG, other, data) != base
    assert ae_cache_key(CFG, clf_dir, data.subset(N_TRAIN - 1, None)) != base
    # the same weights saved elsewhere are the same classifier
    assert ae_cache_key(CFG, save_classifier(tmp_path / "copy", seed=0), data) == base

    cache = tmp_path / "cache"
    e1 = make_training_aes(CFG, clf_dir, data, cache, RT)
    e2 = make_training_aes(AEConfig(steps=2, batch_size=32, eps=4 / 255), clf_dir, data, cache, RT)
    e3 = make_training_aes(CFG, other, data, cache, RT)
    assert len({e1, e2, e3}) == 3 and listing(cache) == sorted(e.name for e in (e1, e2, e3))
    a1, a2, a3 = (load_training_aes(e) for e in (e1, e2, e3))
    x = to_float(data.train_x)
    assert (a2 - x).abs().max() <= 4 / 255 + 1e-6 < (a1 - x).abs().max()
    assert not torch.equal(a1, a3)


def test_cache_hit_equals_what_this_config_crafts(tmp_path, data, clf_dir):
    """The random start is drawn per attack batch, so the batch size changes the AEs; a
    cache hit must never hand back AEs that this config would not have crafted."""
    cache = tmp_path / "cache"
    small = AEConfig(steps=2, batch_size=16)
    make_training_aes(CFG, clf_dir, data, cache, RT)
    got = load_training_aes(make_training_aes(small, clf_dir, data, cache, RT))
    fresh = load_training_aes(make_training_aes(small, clf_dir, data, tmp_path / "fresh", RT))
    assert torch.equal(got, fresh)


def test_crash_during_write_leaves_nothing(tmp_path, data, clf_dir, monkeypatch):
    cache = tmp_path / "cache"

    def partial_save(file, arr, *a, **k):
        Path(file).write_bytes(b"\x93NUMPY\x01\x00" + b"\x00" * 64)  # a torn write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aes.np, "save", partial_save)
    with pytest.raises(OSError, match=r"/cache: cannot write \(no space left on the device"):  # kdp.errors.DiskError
        make_training_aes(CFG, clf_dir, data, cache, RT)
    assert listing(cache) == []  # no entry, no temporary directory
    monkeypatch.undo()
    entry = make_training_aes(CFG, clf_dir, data, cache, RT)
    assert load_training_aes(entry).shape == (N_TRAIN, 3, 32, 32)
    assert listing(cache) == [entry.name]


def test_an_entry_whose_bytes_changed_is_refused_on_read_and_crafted_again(tmp_path, data, clf_dir):
    """Its meta records the array's sha256: a flipped byte (same size) fails the read in one line,
    and making the entry again crafts it again."""
    entry = make_training_aes(CFG, clf_dir, data, tmp_path / "cache", RT)
    good = (entry / AES).read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    (entry / AES).write_bytes(bytes(bad))
    with pytest.raises(aes.CheckpointError, match=r"x_adv.npy: not the AEs its meta.json recorded \(corrupt\)"):
        load_training_aes(entry)
    assert make_training_aes(CFG, clf_dir, data, tmp_path / "cache", RT) == entry
    assert (entry / AES).read_bytes() == good


def test_entry_appearing_while_crafting_is_kept(tmp_path, data, clf_dir, monkeypatch):
    """Another maker finishes first: its entry (which readers may already hold) stays."""
    cache = tmp_path / "cache"
    real_craft = aes.craft
    winner = {}

    def racing_craft(*a, **k):
        out = real_craft(*a, **k)
        monkeypatch.setattr(aes, "craft", real_craft)
        entry = make_training_aes(CFG, clf_dir, data, cache, RT)  # the other process, finishing first
        winner["inode"] = (entry / AES).stat().st_ino
        return out

    monkeypatch.setattr(aes, "craft", racing_craft)
    entry = make_training_aes(CFG, clf_dir, data, cache, RT)
    assert (entry / AES).stat().st_ino == winner["inode"]
    assert listing(cache) == [entry.name]


def test_loader_rejects_bad_entries(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    with pytest.raises(ValueError, match="meta.json"):
        load_training_aes(entry)
    (entry / META).write_text("{}")
    np.save(entry / AES, np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"expected \(N, 3, 32, 32\)") as e:
        load_training_aes(entry)
    assert str(entry / AES) in str(e.value)
    np.save(entry / AES, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot read cached AEs"):
        load_training_aes(entry)


WORKER = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import kdp.stages.aes as aes
    from kdp.config import AEConfig, Runtime
    from kdp.data import load_cifar

    data_dir, clf_dir, cache, sync = map(Path, sys.argv[1:5])
    data = load_cifar(data_dir, n_train=int(sys.argv[5]), n_test=8)
    real_craft, crafted = aes.craft, []

    def wait_for(what, pred, timeout=120):
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                sys.exit(f"worker {os.getpid()}: {what} not within {timeout} s")
            time.sleep(0.005)

    def meeting_craft(*a, **k):  # both makers missed the cache: neither writes before both crafted
        out = real_craft(*a, **k)
        crafted.append(True)
        (sync / f"crafted-{os.getpid()}").touch()
        wait_for("the other maker's AEs", lambda: len(list(sync.glob("crafted-*"))) == 2)
        return out

    aes.craft = meeting_craft
    (sync / f"ready-{os.getpid()}").touch()
    wait_for("go", (sync / "go").exists)
    entry = aes.make_training_aes(AEConfig(steps=2, batch_size=32), clf_dir, data, cache,
                                  Runtime(device="cpu", progress=False))
    x = aes.load_training_aes(entry)  # read right away, while the other maker may be writing
    print(json.dumps({"entry": str(entry), "crafted": bool(crafted), "shape": list(x.shape),
                      "sha": hashlib.sha256(x.numpy().tobytes()).hexdigest()}))
""")


def test_concurrent_makers(tmp_path, data, clf_dir, cifar_subset_dir):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(cifar_subset_dir), str(clf_dir), str(cache), str(sync), str(N_TRAIN)]
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        def ready() -> bool:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            return len(list(sync.glob("ready-*"))) == 2

        wait_until(ready, 90, "workers did not start")
        (sync / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r["crafted"] for r in results)  # both really missed the cache and raced
    assert len(list(sync.glob("crafted-*"))) == 2
    assert results[0]["entry"] == results[1]["entry"]
    assert results[0]["sha"] == results[1]["sha"]
    assert results[0]["shape"] == [N_TRAIN, 3, 32, 32]
    entry = Path(results[0]["entry"])
    assert listing(cache) == [entry.name]  # one entry, no temporary or old directories
    loaded = load_training_aes(entry)
    assert hashlib.sha256(loaded.numpy().tobytes()).hexdigest() == results[0]["sha"]
    assert loaded.shape == (N_TRAIN, 3, 32, 32)
    assert (loaded - to_float(data.train_x)).abs().max() <= CFG.eps + 1e-6
