"""The shared real copies of CIFAR-10: the exact-pixel subset and the full JPEG zip."""
import hashlib

import pytest
import torch

from kdp.data import CLASSES, load_cifar


def test_subset_matches_its_published_hashes(cifar_subset_dir):
    batch = cifar_subset_dir / "cifar-10-batches-py" / "test_batch"
    assert hashlib.sha256(batch.read_bytes()).hexdigest().startswith("7ee4b692f4da")


@pytest.fixture(scope="module")
def full(cifar_jpeg_zip):
    """All 60k images of the JPEG zip, decoded once for this module's tests (about 10 s on 2 cores)."""
    return load_cifar(cifar_jpeg_zip)


@pytest.mark.slow  # decodes 60k JPEGs (the module's `full`)
def test_jpeg_zip_loads_all_60k_and_matches_the_exact_subset(full, cifar_subset_dir):
    exact = load_cifar(cifar_subset_dir)
    assert full.train_x.shape == (50000, 3, 32, 32) and full.test_x.shape == (10000, 3, 32, 32)
    assert full.classes == CLASSES == exact.classes
    assert torch.bincount(full.test_y).tolist() == [1000] * 10
    # test/cat/0000.jpg is test image 0 (a cat): find it among the JPEG test images by its
    # pixels; JPEG is lossy, so compare by PSNR against the exact pixels.
    target = exact.test_x[0].float()
    cats = full.test_x[full.test_y == exact.test_y[0]].float()
    mse = ((cats - target) ** 2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(255.0 ** 2 / mse.min())
    assert exact.test_y[0].item() == CLASSES.index("cat") and psnr > 25, psnr
    # the loader's fixed shuffle mixes classes, so a prefix subset is not one class
    assert len(set(full.subset(100, 100).train_y.tolist())) == 10


@pytest.mark.slow  # decodes 60k JPEGs more (and `full`'s)
def test_the_pack_of_the_jpeg_zip_is_the_same_data_set(cifar_jpeg_zip, full, tmp_path):
    from kdp.datapack import pack

    packed = pack(cifar_jpeg_zip, tmp_path / "cifar10.kdpjpeg")
    assert packed.stat().st_size < 20 * 2**20  # of 59 MiB: what lets it travel to a GPU lease
    a, b = full, load_cifar(packed)
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("train_x", "train_y", "test_x", "test_y"))
