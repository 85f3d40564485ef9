"""kdp.train: seeded, sharded epoch batches; one epoch; the resumable epoch loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kdp.train import epoch_batches, fit, predict, train_epoch
from kdp.accel import resolve_device

# ----------------------------------------------------------------------------- epoch_batches


@pytest.mark.parametrize("n,bs", [(103, 16), (96, 16), (5, 16), (64, 1)])
def test_single_rank_covers_every_index_once(n, bs):
    for epoch in range(3):
        batches = epoch_batches(n, bs, seed=0, epoch=epoch)
        assert len(batches) == -(-n // bs)
        assert all(1 <= len(b) <= bs for b in batches)
        assert all(len(b) == bs for b in batches[:-1])
        assert sorted(torch.cat(batches).tolist()) == list(range(n))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("n", [103, 96])
def test_ranks_are_disjoint_and_cover(world_size, n):
    bs = 16
    per_rank = [epoch_batches(n, bs, seed=3, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
    steps = {len(b) for b in per_rank}
    assert steps == {-(-n // bs)}  # same number of steps on every rank (DDP)
    flat = [torch.cat(b).tolist() for b in per_rank]
    for r in range(world_size):
        assert all(len(b) <= bs // world_size for b in per_rank[r])
        assert len(set(flat[r])) == len(flat[r])
        for q in range(r + 1, world_size):
            assert not set(flat[r]) & set(flat[q])
    assert sorted(sum(flat, [])) == list(range(n))
    # together the ranks' step-s batches are the single-process step-s batch
    single = epoch_batches(n, bs, seed=3, epoch=1)
    for s in range(len(single)):
        assert sorted(torch.cat([per_rank[r][s] for r in range(world_size)]).tolist()) == sorted(single[s].tolist())


def test_ranks_never_get_an_empty_batch():
    # 97 = 6 * 16 + 1: at the last step rank 1 has nothing of its own and reuses one index
    b0 = epoch_batches(97, 16, 0, 0, rank=0, world_size=2)
    b1 = epoch_batches(97, 16, 0, 0, rank=1, world_size=2)
    assert len(b0) == len(b1) == 7
    assert all(len(b) > 0 for b in b0 + b1)
    assert sorted(set(torch.cat(b0 + b1).tolist())) == list(range(97))


def test_permutation_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        return torch.cat(epoch_batches(50, 8, seed, epoch)).tolist()

    torch.manual_seed(1)
    a = order(0, 2)
    torch.manual_seed(999)  # the global RNG does not matter
    torch.rand(10)
    assert order(0, 2) == a
    assert order(0, 3) != a and order(1, 2) != a
    assert a != list(range(50))  # shuffled
    # batch size only regroups the same permutation
    assert torch.cat(epoch_batches(50, 7, 0, 2)).tolist() == a
    assert torch.cat(epoch_batches(50, 8, 0, 2, shuffle=False)).tolist() == list(range(50))


# ----------------------------------------------------------------------------- train_epoch


def test_train_epoch_weights_by_batch_size_and_steps():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(idx):
        loss = model(torch.ones(1, 1)).sum()  # d loss / d w = 1
        return {"loss": loss, "v": idx.float().mean()}

    out = train_epoch(model, opt, [torch.tensor([0, 1, 2]), torch.tensor([3])], step)
    # per-batch means 1 and 3, weighted 3:1 -> mean of 0..3 = 1.5 (not the unweighted 2)
    assert out["v"] == pytest.approx(1.5)
    assert out["loss"] == pytest.approx((3 * 1.0 + 1 * 0.9) / 4)  # weight 1.0, then 0.9 after one step
    assert model.weight.item() == pytest.approx(0.8)  # two SGD steps
    assert model.training


# ----------------------------------------------------------------------------- fit (resume)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _epoch_fn(model, opt, calls):
    x = torch.arange(6.0).view(2, 3) / 10

    def epoch_fn(epoch):
        calls.append((epoch, opt.param_groups[0]["lr"], model.weight.detach().clone()))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        return {"loss": float(epoch)}
    return epoch_fn


def test_fit_resumes_after_last_finished_epoch(tmp_path):
    state = tmp_path / "state.pt"
    model, opt, sched = _setup()
    calls = []
    hist = fit(3, _epoch_fn(model, opt, calls), model, opt, sched, state, progress=False)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert [c[1] for c in calls] == [1.0, 0.5, 0.25]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and [h["loss"] for h in hist] == [0.0, 1.0, 2.0]
    w_after_3 = model.weight.detach().clone()
    momentum = opt.state_dict()["state"][0]["momentum_buffer"].clone()

    # a fresh process: new model (other init), optimizer and scheduler, same state file
    model2, opt2, sched2 = _setup(seed=1)
    assert not torch.equal(model2.weight, w_after_3)
    calls2 = []
    hist2 = fit(5, _epoch_fn(model2, opt2, calls2), model2, opt2, sched2, state, progress=False)
    assert [c[0] for c in calls2] == [3, 4]  # only epochs 4 and 5 run
    assert [c[1] for c in calls2] == [0.125, 0.0625]  # the schedule continued
    assert torch.equal(calls2[0][2], w_after_3)  # weights restored before epoch 4
    assert len(hist2) == 5 and [h["epoch"] for h in hist2] == [1, 2, 3, 4, 5]
    assert hist2[:3] == hist
    assert "momentum_buffer" in opt2.state_dict()["state"][0]

    # the same 5 epochs in one go give the same weights (momentum was restored too)
    model3, opt3, sched3 = _setup()
    fit(5, _epoch_fn(model3, opt3, []), model3, opt3, sched3, None, progress=False)
    assert torch.allclose(model3.weight, model2.weight, atol=1e-7)
    assert not torch.equal(momentum, torch.zeros_like(momentum))

    # nothing left to do: no epoch runs, the history is returned
    calls4 = []
    model4, opt4, sched4 = _setup()
    hist4 = fit(5, _epoch_fn(model4, opt4, calls4), model4, opt4, sched4, state, progress=False)
    assert calls4 == [] and len(hist4) == 5


def test_fit_without_state_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, opt, sched = _setup()
    calls = []
    hist = fit(2, _epoch_fn(model, opt, calls), model, opt, None, None, progress=False)
    assert len(hist) == 2 and len(calls) == 2
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- helpers


def test_predict_uint8_and_float_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x8 = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    p8 = predict(model, x8, torch.device("cpu"), batch_size=3)
    pf = predict(model, x8.float() / 255, torch.device("cpu"), batch_size=5)
    assert p8.shape == (7,) and torch.equal(p8, pf)
    assert torch.equal(p8, model(x8.float() / 255).argmax(1))
    assert predict(model, x8[:0], torch.device("cpu")).numel() == 0


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------- exact resume

class Interrupted(Exception):
    """Stands in for a crash right after an epoch's state was saved."""


@pytest.mark.parametrize("stage_name", ["classifier", "teacher_at", "student_kd_at_nt",
                                        *(pytest.param(b, marks=pytest.mark.slow)  # their PGD: seconds an epoch
                                          for b in ("baseline_at_classifier", "baseline_e2e_at"))])
def test_a_resumed_stage_ends_with_the_weights_of_an_uninterrupted_one(stage_name, tiny_run, tmp_path,
                                                                       cifar_subset_dir):
    """3 epochs straight vs. stopped after epoch 1 and resumed from its state file with the
    process's random states scrambled (as in a new process): the same weights, bit for bit
    (CPU, one thread). The tiny run gives each stage its inputs."""
    import dataclasses
    import random

    import numpy as np

    from conftest import torch_threads
    from kdp.checkpoint import load_checkpoint, read_meta
    from kdp.config import Runtime
    from kdp.data import load_cifar
    from kdp.graph import pipeline_graph
    from kdp.scheduler import state_path
    from kdp.stages.drivers import RECIPES
    from kdp.presets import get_preset
    from kdp.stages.common import fit_local

    cfg = get_preset("tiny")
    stage = {s.name: s for s in pipeline_graph(cfg)}[stage_name]
    stage_cfg = dataclasses.replace(stage.config, epochs=3)
    made = {"classifier": tiny_run / "classifier", "aes": next((tiny_run.parent / "cache" / "aes").iterdir())}
    inputs = {n: made.get(n, tiny_run / n) for n in stage.needs}
    data = load_cifar(str(cifar_subset_dir), cfg.data.n_train, cfg.data.n_test)
    rt = Runtime(device="cpu", progress=False)

    def train(out, stop_after=None):
        def on_epoch(epoch, metrics):
            if metrics is not None and epoch + 1 == stop_after:
                raise Interrupted
        return fit_local(RECIPES[stage.fn], stage_cfg, inputs, data, out, rt, state_path(out), stage_name, on_epoch)

    with torch_threads(1):
        whole = train(tmp_path / "whole" / stage_name)
        with pytest.raises(Interrupted):
            train(tmp_path / "cut" / stage_name, stop_after=1)
        torch.manual_seed(12345), np.random.seed(12345), random.seed(12345)
        cut = train(tmp_path / "cut" / stage_name)
    a = load_checkpoint(whole, torch.device("cpu"))[0].state_dict()
    b = load_checkpoint(cut, torch.device("cpu"))[0].state_dict()
    assert [h["epoch"] for h in read_meta(cut)["metrics"]["history"]] == [1, 2, 3]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
