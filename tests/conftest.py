"""Shared fixtures: the real CIFAR-10 subset (read-only, outside the repo) and a tiny slice of it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kdp.data import load_cifar

# 2 cores in CI. KDP_TEST_THREADS lets a developer use 1 thread when the machine is busy
# (two OpenMP pools oversubscribing 2 cores slow torch down by an order of magnitude).
torch.set_num_threads(int(os.environ.get("KDP_TEST_THREADS", "2")))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_SUBSET = SHARED_DATA / "cifar10-subset"
CIFAR_JPEG_ZIP = SHARED_DATA / "cifar10-jpeg.zip"


@pytest.fixture(scope="session")
def cifar_subset_dir() -> Path:
    """The 5085/1017-image CIFAR-10 subset in the python-pickle layout (never copied here)."""
    if not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {CIFAR_SUBSET}")
    return CIFAR_SUBSET


@pytest.fixture(scope="session")
def cifar_jpeg_zip() -> Path:
    """All 60000 CIFAR-10 images as an ImageFolder zip of JPEGs (lossy; never copied here)."""
    if not CIFAR_JPEG_ZIP.is_file():
        pytest.skip(f"CIFAR-10 JPEG zip not found at {CIFAR_JPEG_ZIP}")
    return CIFAR_JPEG_ZIP


@pytest.fixture(scope="session")
def tiny_data(cifar_subset_dir):
    """The first 256 training and 64 test images of the subset (treat as read-only)."""
    return load_cifar(cifar_subset_dir, n_train=256, n_test=64)
