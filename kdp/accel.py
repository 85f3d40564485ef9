"""The GPU fast paths, chosen by `Runtime` and resolved once per stage for its device.

Each switch is 'auto' (on for CUDA, off elsewhere), 'on' (everywhere: the CPU tests run
them) or 'off' (the reference path):
- bf16: autocast to bfloat16 in training steps; BatchNorm keeps fp32 parameters and
  statistics, losses are computed in fp32. Attacks (training AEs and the evaluation) always
  run in fp32, so an attack's strength never depends on the precision (`for_attacks`).
- channels_last: NHWC models and image batches (what cuDNN's tensor-core kernels read).
- compile: `torch.compile` of the model a training step calls, and of the frozen models in
  its loss; if compiling fails the model runs eager from then on, with one warning.
On CUDA cuDNN autotuning (`cudnn.benchmark`) is on whenever a fast path is.

With every switch off (the default on CPU) `Accel` changes nothing: the reference path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from kdp.errors import ConfigError

SWITCH = ("auto", "on", "off")
COMPILE = ("auto", "off", "default", "reduce-overhead", "max-autotune")


def _on(value: str, device: torch.device) -> bool:
    return value == "on" or (value == "auto" and device.type == "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; errors name an unusable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class Accel:
    """The fast paths in force for one device."""
    device: torch.device
    """Where the stage runs."""
    bf16: bool = False
    """bf16 autocast in training steps."""
    channels_last: bool = False
    """NHWC models and image batches."""
    compile: str | None = None
    """torch.compile mode of training-step models; None: eager."""

    @classmethod
    def of(cls, rt, device: torch.device | str | None = None) -> "Accel":
        """Resolve `rt`'s switches (kdp.config.Runtime) for `device` (default: rt.device)."""

        device = torch.device(device) if device is not None else resolve_device(rt.device)
        mode = rt.compile
        if mode == "auto":
            mode = "default" if device.type == "cuda" else "off"
        acc = cls(device, _on(rt.bf16, device), _on(rt.channels_last, device), None if mode == "off" else mode)
        if device.type == "cuda" and (acc.bf16 or acc.channels_last or acc.compile):
            torch.backends.cudnn.benchmark = True  # static shapes: pick each conv's fastest kernel once
        return acc

    @property
    def for_attacks(self) -> "Accel":
        """Attacks run fp32 and eager (see the module docstring); the memory format stays."""
        return dataclasses.replace(self, bf16=False, compile=None)

    def describe(self) -> str:
        """'fp32' for the reference path, else the fast paths joined by '+', e.g. 'bf16+channels_last+compile'."""
        parts = ["bf16"] * self.bf16 + ["channels_last"] * self.channels_last
        parts += [f"compile:{self.compile}"] if self.compile else []
        return "+".join(parts) or "fp32"

    def autocast(self):
        """The training step's precision context."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def module(self, model: nn.Module) -> nn.Module:
        """`model` on the device, NHWC where that is on (in place, as nn.Module.to)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch in the memory format the models expect."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def compiled(self, model: nn.Module) -> nn.Module:
        """`model` through torch.compile (with an eager fallback), or `model` itself when compile is off.
        Train and save `model`, not the wrapper: the wrapper only runs it."""
        return Compiled(model, self.compile) if self.compile else model


class Compiled(nn.Module):
    """Runs `module` compiled. If a compiled call raises and the same call then succeeds
    eager, compiling is what failed: the module runs eager from then on (one warning). If the
    eager call fails too, that error is raised: a bug keeps its traceback."""

    def __init__(self, module: nn.Module, mode: str = "default"):
        super().__init__()
        self.module = module
        self.mode = mode
        self.fallback: str | None = None
        self._fn = torch.compile(module, mode=mode)
        self.train(module.training)

    def forward(self, *args, **kwargs):
        if self.fallback is None:
            try:
                return self._fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - decided below by the eager call
                out = self.module(*args, **kwargs)  # raises the real error if it was not the compiler
                self.fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"[accel] torch.compile(mode={self.mode!r}) failed ({self.fallback[:200]}); "
                      f"running {type(self.module).__name__} eager", file=sys.stderr, flush=True)
                return out
        return self.module(*args, **kwargs)
