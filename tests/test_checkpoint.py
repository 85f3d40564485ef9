"""kdp.checkpoint: self-describing checkpoints, weights_only loading, crash-safe writes."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from kdp.checkpoint import (META, WEIGHTS, CheckpointError, StageConflict, filled, is_complete, load_checkpoint,
                            load_state, read_meta, save_checkpoint, save_state)
from kdp.files import atomic_dir, atomic_path, write_json
from kdp.models import CifarResNet, build_model

SPEC = {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}


class Payload:
    """An arbitrary (non-tensor) object; torch.load(weights_only=True) must refuse it."""

    def __init__(self):
        self.x = 1


class Evil:
    """Loading this with the full unpickler would run a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_model(seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    m = build_model(SPEC["kind"], SPEC["name"], **SPEC["kwargs"])
    with torch.no_grad():  # make buffers non-default too, so they must round-trip
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    return m


def listing(d):
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- round trip


def test_checkpoint_round_trip(tmp_path):
    m = tiny_model()
    path = tmp_path / "ckpt"
    out = save_checkpoint(path, m, SPEC, {"lr": 0.1, "arch": "resnet8"}, {"test_acc": 0.5},
                          {"git_sha": "abc"})
    assert out == path and is_complete(path)
    assert listing(path) == sorted([WEIGHTS, META])
    assert listing(tmp_path) == ["ckpt"]  # no temporary directories left

    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, CifarResNet) and loaded is not m
    sd, lsd = m.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys()
    for k in sd:
        assert torch.equal(sd[k], lsd[k]), k
    assert meta["spec"] == SPEC
    assert meta["config"] == {"lr": 0.1, "arch": "resnet8"}
    assert meta["metrics"] == {"test_acc": 0.5}
    assert meta["provenance"] == {"git_sha": "abc"}
    assert meta["weights_sha256"] == hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    assert read_meta(path) == meta
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), loaded.eval()(x))


def test_a_field_added_since_a_checkpoint_was_made_counts_as_its_default(tmp_path):
    """A checkpoint recorded before kdp added a config field (SOAP's momentum) is still the stage's
    output while the field holds its default; another value, or a changed field, conflicts."""
    path = save_checkpoint(tmp_path / "soap", tiny_model(), SPEC, {"lr": 0.1}, {}, {})
    defaults = {"lr": 0.1, "momentum": 0.9}
    assert is_complete(path, {"lr": 0.1, "momentum": 0.9}, defaults)
    with pytest.raises(StageConflict, match="momentum"):
        is_complete(path, {"lr": 0.1, "momentum": 0.5}, defaults)
    with pytest.raises(StageConflict, match="momentum"):
        is_complete(path, {"lr": 0.1, "momentum": 0.9})  # without defaults: as before, exact
    with pytest.raises(StageConflict, match="lr"):
        is_complete(path, {"lr": 0.2, "momentum": 0.9}, defaults)
    nested = filled({"soap": {"lr": 0.1}, "name": "a"}, {"soap": {"lr": 0.1, "momentum": 0.9}, "name": "kdp"})
    assert nested == {"soap": {"lr": 0.1, "momentum": 0.9}, "name": "a"}


def test_checkpoint_overwrite_replaces_whole(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(0), SPEC, {"v": 1})
    (path / "stray.txt").write_text("from the old run")
    m2 = tiny_model(1)
    save_checkpoint(path, m2, SPEC, {"v": 2})
    loaded, meta = load_checkpoint(path)
    assert meta["config"] == {"v": 2}
    assert torch.equal(loaded.fc.weight, m2.fc.weight)
    assert not (path / "stray.txt").exists()
    assert listing(tmp_path) == ["ckpt"]


def test_different_weights_different_sha(tmp_path):
    save_checkpoint(tmp_path / "a", tiny_model(0), SPEC, {})
    save_checkpoint(tmp_path / "b", tiny_model(1), SPEC, {})
    assert read_meta(tmp_path / "a")["weights_sha256"] != read_meta(tmp_path / "b")["weights_sha256"]


# ----------------------------------------------------------------------------- refusing and reporting


@pytest.mark.parametrize("kind", ["payload", "evil"])
def test_load_refuses_pickled_objects(tmp_path, kind):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(), SPEC, {})
    marker = tmp_path / "pwned"
    obj = {"fc.weight": Payload()} if kind == "payload" else Evil(marker)
    torch.save(obj, path / WEIGHTS)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path / WEIGHTS) in str(e.value)
    assert not marker.exists()


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found") as e:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_missing_weights(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(), SPEC, {})
    (path / WEIGHTS).unlink()
    assert not is_complete(path)
    with pytest.raises(CheckpointError, match="weights not found") as e:
        load_checkpoint(path)
    assert str(path / WEIGHTS) in str(e.value)


def test_missing_and_corrupt_json(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(), SPEC, {})
    (path / META).write_text('{"spec": {"kind": "classifier", ')
    with pytest.raises(CheckpointError, match="corrupt JSON") as e:
        load_checkpoint(path)
    assert str(path / META) in str(e.value)
    (path / META).write_text(json.dumps({"config": {}}))
    with pytest.raises(CheckpointError, match="no model spec") as e:
        load_checkpoint(path)
    assert str(path / META) in str(e.value)
    (path / META).unlink()
    with pytest.raises(CheckpointError, match="checkpoint.json not found") as e:
        read_meta(path)
    assert str(path / META) in str(e.value)


def test_weights_not_matching_spec(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(), {**SPEC, "kwargs": {"width": 8}}, {})  # spec lies about width
    with pytest.raises(CheckpointError, match="cannot load weights") as e:
        load_checkpoint(path)
    assert str(path / WEIGHTS) in str(e.value)


def test_truncated_weights(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(), SPEC, {})
    blob = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(blob[: len(blob) // 3])
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_dir_failure_keeps_previous(tmp_path):
    path = tmp_path / "entry"
    path.mkdir()
    (path / "a.txt").write_text("old")
    (path / "b.txt").write_text("old b")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(path) as tmp:
            assert tmp.is_dir() and tmp != path and tmp.parent == tmp_path and listing(tmp) == []
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (path / "a.txt").read_text() == "old" and (path / "b.txt").read_text() == "old b"
    assert listing(tmp_path) == ["entry"]


def test_atomic_dir_failure_without_previous(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "entry") as tmp:
            (tmp / "half").write_bytes(b"x")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_atomic_dir_success_replaces_whole(tmp_path):
    path = tmp_path / "sub" / "entry"
    with atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("first")
        (tmp / "b.txt").write_text("first b")
    assert listing(path) == ["a.txt", "b.txt"]
    with atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("second")
    assert listing(path) == ["a.txt"] and (path / "a.txt").read_text() == "second"
    assert listing(tmp_path / "sub") == ["entry"]


def test_atomic_dir_keeps_entry_that_appeared_meanwhile(tmp_path):
    """Another process won the race: its directory stays (readers may hold it), ours goes."""
    path = tmp_path / "entry"
    with atomic_dir(path) as tmp:
        (tmp / "who").write_text("late")
        path.mkdir()
        (path / "who").write_text("winner")
        winner_inode = (path / "who").stat().st_ino
    assert (path / "who").read_text() == "winner"
    assert (path / "who").stat().st_ino == winner_inode
    assert listing(tmp_path) == ["entry"]


def test_atomic_path_failure_keeps_previous(tmp_path):
    path = tmp_path / "state.pt"
    path.write_text("old")
    with pytest.raises(OSError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path
            tmp.write_text("half-writ")
            raise OSError("disk full")
    assert path.read_text() == "old"
    assert listing(tmp_path) == ["state.pt"]
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and listing(tmp_path) == ["state.pt"]


def test_write_json(tmp_path):
    write_json(tmp_path / "x" / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "x" / "m.json").read_text()) == {"a": [1, 2], "b": 1}
    assert listing(tmp_path / "x") == ["m.json"]


# ----------------------------------------------------------------------------- training state


def test_state_round_trip(tmp_path):
    m = tiny_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}, "epoch": 3,
             "history": [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 2.0}, {"epoch": 3, "loss": 1.5}]}
    path = tmp_path / "run" / "state.pt"
    assert load_state(path) is None
    save_state(path, state)
    back = load_state(path)
    assert back["epoch"] == 3 and back["history"] == state["history"] and back["scheduler"] == {}
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v), k
    mom = opt.state_dict()["state"]
    assert mom and all(torch.equal(back["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
                       for i, s in mom.items())
    assert back["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert listing(path.parent) == ["state.pt"]


def test_state_refuses_objects_and_garbage(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"epoch": 1, "thing": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot load training state") as e:
        load_state(path)
    assert str(path) in str(e.value)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        load_state(path)
    assert str(path) in str(e.value)
