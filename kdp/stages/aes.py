"""The training AEs: PGD on the frozen classifier, computed once and cached.

They depend only on the classifier's weights, the AE config (batch size included), the
attack's settings as built (and the torch and torchattacks versions) and the training
images, so the cache key hashes exactly those. An entry is a directory with
`x_adv.npy` (float32, N x 3 x 32 x 32, no pickle) and `meta.json`; it appears whole via a
rename, so concurrent makers (sweep trials, two teachers) never see half of one.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from kdp.accel import Accel
from kdp.attacks import attack_batches, build_attack, settings_of
from kdp.checkpoint import load_frozen, read_meta
from kdp.files import read_json
from kdp.config import AEConfig, Runtime
from kdp.data import Cifar, to_float
from kdp.provenance import provenance
from kdp.accel import resolve_device
from kdp.errors import CheckpointError
from kdp.stages.eval_cache import AES, META, complete, intact, save_entry, touch



def ae_cache_key(cfg: AEConfig, classifier_dir: Path, data: Cifar) -> str:
    ident = {"classifier_sha256": read_meta(classifier_dir)["weights_sha256"],
             "attack": cfg.key_fields(), "data_sha256": data.fingerprint(), "n": len(data.train_y),
             "settings": settings_of(cfg.attack, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def craft(cfg: AEConfig, classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
          device: torch.device, start: int = 0, progress: bool = False) -> torch.Tensor:
    """AEs of float images x (CPU, [0, 1]) against `classifier`; images [start, start+len(x))."""
    from tqdm.auto import tqdm

    attack = build_attack(cfg.attack, classifier, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps)
    gen = attack_batches(attack, x, y, cfg.batch_size, cfg.seed, start=start, device=device)
    total = -(-len(x) // cfg.batch_size)
    return torch.cat([b.cpu() for b in tqdm(gen, total=total, desc="training AEs", disable=not progress)])


def make_training_aes(cfg: AEConfig, classifier_dir: Path, data: Cifar, cache_root: Path,
                      rt: Runtime = Runtime()) -> Path:
    """Return the cache entry of these AEs, crafting it first if it is missing."""
    entry = Path(cache_root) / ae_cache_key(cfg, Path(classifier_dir), data)
    if complete(entry) and intact(entry):
        return entry
    device = resolve_device(rt.device)
    classifier = Accel.of(rt, device).for_attacks.module(load_frozen(classifier_dir, device))
    x, y = to_float(data.train_x), data.train_y
    t0 = time.perf_counter()
    x_adv = craft(cfg, classifier, x, y, device, progress=rt.progress)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        adv_acc = sum((classifier(x_adv[i:i + 512].to(device)).argmax(1).cpu() == y[i:i + 512]).sum().item()
                      for i in range(0, len(y), 512)) / max(len(y), 1)
    meta = {"config": cfg.key_fields(), "classifier_dir": str(classifier_dir),
            "classifier_sha256": read_meta(classifier_dir)["weights_sha256"],
            "data_sha256": data.fingerprint(), "n": len(y), "seconds": seconds,
            "classifier_acc_on_aes": adv_acc, "linf_max": float((x_adv - x).abs().max()) if len(y) else 0.0,
            "provenance": provenance(rt)}
    # another maker may have finished while we crafted: keep its entry (readers may hold it)
    if complete(entry) and intact(entry):
        return entry
    save_entry(entry, x_adv, meta)
    return entry


def load_training_aes(entry: Path) -> torch.Tensor:
    """The cached AEs of an entry as a float32 tensor (N, 3, 32, 32)."""
    entry = Path(entry)
    read_json(entry / META, "AE cache meta.json")
    touch(entry / META)  # used now (kdp cache prunes by last use)
    try:
        arr = np.load(entry / AES, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{entry / AES}: cannot read cached AEs ({e})") from None
    if arr.ndim != 4 or arr.shape[1:] != (3, 32, 32):
        raise CheckpointError(f"{entry / AES}: expected (N, 3, 32, 32) AEs, got {arr.shape}")
    if not intact(entry, arr):
        raise CheckpointError(f"{entry / AES}: not the AEs its meta.json recorded (corrupt); delete {entry} "
                              "and run again: they are crafted again")
    return torch.from_numpy(arr)
