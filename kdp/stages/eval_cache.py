"""The evaluation AE cache: AEs crafted on a fixed source model are computed once.

Under the `classifier` and `transfer` threat models an attack's AEs depend only on the model
they are crafted on (the classifier, SOAP's own, the surrogate), the attack and its settings,
the seed, the batch boundaries and the test images. The key hashes exactly those: the model
by its weights, the attack by every setting of its built pieces and the torch and
torchattacks versions (`kdp.attacks.settings`), so sweep trials and re-runs that share a
classifier reuse them, and an edited attack never gets the old AEs.
An entry is `<cache>/<key>/x_adv.npy` (float32, no pickle) plus `meta.json` (which records the
array's sha256, checked on every read), and appears whole by a rename (`atomic_dir`); the `full` threat model's AEs depend on the defense and
are never cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kdp.files import atomic_dir
from kdp.locks import held

AES, META = "x_adv.npy", "meta.json"  # a cache entry, training or evaluation AEs: both files


def complete(entry: Path) -> bool:
    """Is `entry` a finished AE cache entry (of either cache)? Both its files: it appears whole."""
    return (entry / AES).is_file() and (entry / META).is_file()


def tensor_sha(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_sha(model: nn.Module) -> str:
    """The model's identity for the cache: a hash of its parameters and buffers, in order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(tensor_sha(v).encode())
    return h.hexdigest()


def cache_key(model: nn.Module, attack: str, settings: list[dict], seed: int, batch_size: int, start: int,
              x: torch.Tensor, y: torch.Tensor) -> str:
    ident = {"model": model_sha(model), "attack": attack, "settings": settings, "seed": seed,
             "batch_size": batch_size, "start": start, "images": tensor_sha(x, y),
             "best_point": 1}  # entries since kdp.trace: each image's best point, the trace counts in meta
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def traced(d: dict) -> dict:
    """The `trace.*` counts among `d`'s items (kdp.trace): what the attack did, kept with its AEs."""
    return {k: v for k, v in d.items() if k.startswith("trace.")}


def entry_trace(entry: Path) -> dict:
    """The `trace.*` counts an entry's meta recorded of the attack that made it."""
    try:
        return traced(json.loads((entry / META).read_text()))
    except (OSError, ValueError):
        return {}


def array_sha(arr: np.ndarray) -> str:
    """The sha256 of an array's bytes (C order), without copying a contiguous one."""
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


def intact(entry: Path, arr: np.ndarray | None = None) -> bool:
    """Are the AEs of `entry` the bytes its meta.json recorded? `arr`: the AEs already read (else
    read here, only when a sha256 is recorded: entries made before the record are taken as
    they are)."""
    try:
        want = json.loads((entry / META).read_text()).get("aes_sha256")
    except (OSError, ValueError, AttributeError):
        return False
    if want is None:
        return True
    if arr is None:
        try:
            arr = np.load(entry / AES, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError):
            return False
    return want == array_sha(arr)


def load_entry(entry: Path, n: int) -> torch.Tensor | None:
    """The cached AEs of `entry`, or None when it is missing, not what was asked for, or not the
    bytes its meta recorded: then they are crafted again and replace it."""
    if not complete(entry):
        return None
    try:
        arr = np.load(entry / AES, allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable: craft again and replace it
    if arr.shape != (n, 3, 32, 32) or not intact(entry, arr):
        return None
    touch(entry / META)
    return torch.from_numpy(arr)


def touch(meta: Path) -> None:
    """Mark a cache entry as used now (`kdp cache` prunes by last use); best effort."""
    try:
        os.utime(meta)
    except OSError:
        pass


def save_entry(entry: Path, x_adv: torch.Tensor, meta: dict) -> None:
    """Write an entry of either cache whole: the AEs and their meta, which records their sha256."""
    arr = np.ascontiguousarray(x_adv.numpy().astype(np.float32))
    with atomic_dir(entry) as tmp:
        np.save(tmp / AES, arr, allow_pickle=False)
        (tmp / META).write_text(json.dumps({**meta, "aes_sha256": array_sha(arr)}, indent=2, sort_keys=True))


def fetched(entry: Path, store) -> Path:
    """A cache entry, fetched from a bucket `store` first if it has it (one that fails its
    commit's check is not fetched: a miss, so the AEs are crafted again)."""
    if store is not None and store.remote:
        store.pull(entry)
    return entry


def saving(batches, entry: Path, meta: dict, info: dict, batched, store=None):
    """Pass the batches through; once all were made, store them as a cache entry (published to
    a bucket `store`). One maker per entry on a node: under the entry's lock, read what another
    process made meanwhile instead."""
    with held(entry.parent / f"{entry.name}.lock", f"crafting {meta['attack']} AEs"):
        hit = load_entry(fetched(entry, store), meta["n"])
        if hit is not None:
            info.update({"attack.cached": True, **entry_trace(entry)})
            yield from batched(hit)
            return
        made = []
        for xb in batches:
            made.append(xb.cpu())
            yield xb
        save_entry(entry, torch.cat(made), {**meta, **traced(info)})
        if store is not None:
            store.push(entry)
