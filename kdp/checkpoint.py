"""Self-describing checkpoints.

A checkpoint is a directory holding `model.pt` (a state_dict, loaded with
weights_only=True) and `checkpoint.json` (the model's registry spec, the stage config,
metrics and provenance): enough to rebuild the model with nothing else. It is written
whole or not at all (kdp.files.atomic_dir), as are training states (kdp.files.atomic_path).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from kdp.errors import CheckpointError  # noqa: F401 (re-exported)
from kdp.files import atomic_dir, atomic_path, file_sha256, read_json
from kdp.models import build_model, freeze

WEIGHTS, META = "model.pt", "checkpoint.json"


def save_checkpoint(path: str | Path, model: nn.Module, spec: dict, config: dict,
                    metrics: dict | None = None, provenance: dict | None = None) -> Path:
    """Write model weights plus {spec, config, metrics, provenance} atomically; returns path.

    spec: {"kind": "classifier"|"purifier", "name": registry name, "kwargs": {...}}.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        torch.save(state, tmp / WEIGHTS)
        meta = {"spec": spec, "config": config, "metrics": metrics or {},
                "provenance": provenance or {}, "weights_sha256": file_sha256(tmp / WEIGHTS)}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return Path(path)


def read_meta(path: str | Path) -> dict:
    """The checkpoint.json of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    meta = read_json(path / META, "checkpoint.json")
    if "spec" not in meta:
        raise CheckpointError(f"{path / META}: no model spec")
    return meta


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint directory and load its weights; returns (model, meta)."""
    path = Path(path)
    meta = read_meta(path)
    spec = meta["spec"]
    model = build_model(spec["kind"], spec["name"], **spec.get("kwargs", {}))
    try:
        state = torch.load(path / WEIGHTS, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise CheckpointError(f"{path / WEIGHTS}: weights not found") from None
    except Exception as e:
        raise CheckpointError(f"{path / WEIGHTS}: cannot load weights ({type(e).__name__}: {e})") from None
    return model.to(device), meta


def load_frozen(path, device="cpu") -> nn.Module:
    """A checkpoint's model in eval mode with no parameter gradients (a classifier, a teacher)."""
    return freeze(load_checkpoint(path, device)[0])


class StageConflict(CheckpointError):
    """A finished checkpoint exists at the output path but was made with another config."""


def filled(old: dict, defaults: dict | None) -> dict:
    """A config as recorded, with the keys it lacks taken from `defaults` (its class's defaults,
    recorded the same way), nested dicts alike: a field added to kdp since the record was
    written behaved as its default then, so the record still matches and the run resumes."""
    out = dict(old)
    for k, v in (defaults or {}).items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = filled(out[k], v)
    return out


def is_complete(path: str | Path, config: dict | None = None, defaults: dict | None = None) -> bool:
    """Is `path` a finished checkpoint? With `config` (a stage's flattened config), the one
    question every skip asks: it must have been made with that config (else StageConflict;
    a key the record lacks counts as its value in `defaults`, kdp.checkpoint.filled) and its
    weights must still match the sha256 it recorded (else CheckpointError)."""
    path = Path(path)
    if not ((path / WEIGHTS).is_file() and (path / META).is_file()):
        return False
    if config is None:
        return True
    meta = read_meta(path)
    old = filled(meta["config"], defaults)
    if old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise StageConflict(f"{path}: exists with a different config ({', '.join(diff)}); "
                            "use another run name or delete it")
    if file_sha256(path / WEIGHTS) != meta.get("weights_sha256"):
        raise CheckpointError(f"stage {path.name}: {path / WEIGHTS} does not match the weights_sha256 in its "
                              f"checkpoint.json (changed or corrupt); delete {path} to train it again")
    return True


def save_state(path: str | Path, state: dict) -> None:
    """Training state (model, optimizer, scheduler, epoch, history) for resuming a stage."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict | None:
    """The saved training state, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load training state ({type(e).__name__}: {e})") from None
