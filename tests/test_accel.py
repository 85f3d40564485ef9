"""The fast paths (kdp.accel) against the reference path, on the CPU: channels_last and compile
compute the same function to float rounding, bf16 to bf16's precision; the reference path is
untouched; a failing compile falls back to eager, a bug in the model still raises.

Tolerances (relative L2 error of the outputs and of all parameter gradients as one vector, against fp32 NCHW
eager): channels_last and compile 1e-4 (fp32, another summation order); bf16 autocast 3e-2 on
outputs and 0.35 on gradients. bf16's gradient error is large because BatchNorm's backward
subtracts the batch means of its gradient, a cancellation that magnifies the input's rounding:
one Conv-BN-ReLU block alone gives 3% on its weight gradient (fp32 statistics do not help: the
rounding is in the activations), the 8-block CAE 24-26% and ResNet-8 8-10% (seeds 0-2). That
is well inside minibatch noise, so bf16 is also held to what matters, the result of training:
the same 40 Adam steps end within 5% of the reference's loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.accel import Accel, Compiled
from kdp.config import Runtime
from kdp.models import build_model

CPU = torch.device("cpu")
MODELS = {"cae": lambda: build_model("purifier", "cae", depth=4, width=8),
          "resnet8": lambda: build_model("classifier", "resnet8", width=8)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def forward_backward(model: nn.Module, acc: Accel, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and parameter gradients of one training-mode step of a scalar loss."""
    model.zero_grad(set_to_none=True)
    runner = acc.compiled(model)
    with acc.autocast():
        out = runner(acc.images(x))
    out = out.float()
    loss = F.mse_loss(out, x) if out.dim() == 4 else F.cross_entropy(out, torch.arange(len(x)) % 10)
    loss.backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def compare(name: str, acc: Accel, out_tol: float, grad_tol: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    ref_model, fast_model = MODELS[name](), MODELS[name]()
    fast_model.load_state_dict(ref_model.state_dict())
    ref_out, ref_grads = forward_backward(ref_model, Accel.of(Runtime(device="cpu")), x)
    out, grads = forward_backward(acc.module(fast_model), acc, x)
    assert out.shape == ref_out.shape and torch.isfinite(out).all()
    assert rel(out, ref_out) < out_tol, rel(out, ref_out)
    # over the whole gradient: a conv bias before a BatchNorm has a gradient of rounding noise alone
    g_err = rel(torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in ref_grads]))
    assert g_err < grad_tol, g_err


def test_the_reference_path_is_the_default_on_cpu_and_changes_nothing():
    acc = Accel.of(Runtime(device="cpu"))
    assert (acc.bf16, acc.channels_last, acc.compile, acc.describe()) == (False, False, None, "fp32")
    model, x = MODELS["cae"](), torch.rand(2, 3, 32, 32)
    assert acc.module(model) is model and acc.compiled(model) is model and acc.images(x) is x


def test_switches_resolve_per_device_and_attacks_stay_fp32_eager():
    on = Accel.of(Runtime(device="cpu", bf16="on", channels_last="on", compile="reduce-overhead"))
    assert on.describe() == "bf16+channels_last+compile:reduce-overhead"
    assert on.for_attacks.describe() == "channels_last"
    auto_on_cuda = Accel.of(Runtime(), device="cuda")  # resolving needs no GPU
    assert (auto_on_cuda.bf16, auto_on_cuda.channels_last, auto_on_cuda.compile) == (True, True, "default")
    off = Accel.of(Runtime(bf16="off", channels_last="off", compile="off"), device="cuda")
    assert off.describe() == "fp32"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_is_the_same_function(name):
    compare(name, Accel(CPU, channels_last=True), 1e-4, 1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_autocast_is_within_bf16_precision(name):
    compare(name, Accel(CPU, bf16=True), 3e-2, 0.35)


def test_bf16_training_ends_where_the_reference_ends():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 32, 32)
    losses = {}
    for acc in (Accel(CPU), Accel(CPU, bf16=True, channels_last=True)):
        torch.manual_seed(1)
        model = acc.module(MODELS["cae"]())
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        with torch.no_grad():
            start = F.mse_loss(model(x), x).item()
        for _ in range(40):
            with acc.autocast():
                loss = F.mse_loss(model(acc.images(x)).float(), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[acc.describe()] = loss.item()
    ref, fast = losses["fp32"], losses["bf16+channels_last"]
    assert ref < 0.5 * start and abs(fast - ref) < 0.05 * ref, (start, losses)


@pytest.mark.slow  # torch.compile on the CPU, 4-11 s a model: CI
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_is_the_same_function(name):
    compare(name, Accel(CPU, compile="default"), 1e-4, 1e-4)


def test_a_compile_that_fails_falls_back_to_eager_once(monkeypatch, capsys):
    def broken_compile(module, **kw):
        def fn(*a, **k):
            raise RuntimeError("backend exploded")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, x = MODELS["resnet8"]().eval(), torch.rand(2, 3, 32, 32)
    wrapped = Compiled(model)
    assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
    assert "backend exploded" in wrapped.fallback
    assert capsys.readouterr().err.count("running CifarResNet eager") == 1


def test_a_bug_in_the_model_is_raised_not_hidden_by_the_fallback(monkeypatch):
    class Buggy(nn.Module):
        def forward(self, x):
            raise ValueError("shape bug")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    with pytest.raises(ValueError, match="shape bug"):
        Compiled(Buggy())(torch.rand(1))
