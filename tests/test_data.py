"""kdp.data: the pickle layout (real subset and hand-made), the restricted unpickler,
validation errors, ImageFolder trees and zips, augmentation and to_float."""
from __future__ import annotations

import os
import pickle
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdp.data import BATCH_DIR, CLASSES, DataError, augment, load_cifar, safe_unpickle, to_float

# ----------------------------------------------------------------------------- helpers


def _batch(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def _dump(path: Path, obj, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _key(k: str, bytes_keys: bool):
    return k.encode() if bytes_keys else k


def write_batch_dir(root: Path, train_rows=(3, 1, 0, 5, 2), test_rows=4, protocol=4, bytes_keys=False,
                    label_names=None) -> dict:
    """A CIFAR python layout with the given row counts; returns what was written."""
    root.mkdir(parents=True, exist_ok=True)
    written = {"train": [], "test": None}
    for i, n in enumerate(train_rows, 1):
        data, labels = _batch(n, seed=i)
        obj = {_key("data", bytes_keys): data, _key("labels", bytes_keys): labels,
               _key("batch_label", bytes_keys): b"training batch" if bytes_keys else "training batch"}
        _dump(root / f"data_batch_{i}", obj, protocol)
        written["train"].append((data, labels))
    data, labels = _batch(test_rows, seed=99)
    _dump(root / "test_batch", {_key("data", bytes_keys): data, _key("labels", bytes_keys): labels}, protocol)
    written["test"] = (data, labels)
    if label_names is not None:
        names = [n.encode() for n in label_names] if bytes_keys else list(label_names)
        _dump(root / "batches.meta", {_key("label_names", bytes_keys): names}, protocol)
    return written


class _Evil:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- real subset


def test_real_subset_sizes_dtypes_labels(cifar_subset_dir):
    d = load_cifar(cifar_subset_dir)
    assert d.train_x.shape == (5085, 3, 32, 32) and d.test_x.shape == (1017, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.test_x.dtype == torch.uint8
    assert d.train_y.shape == (5085,) and d.test_y.shape == (1017,)
    assert d.train_y.dtype == torch.int64
    for y in (d.train_y, d.test_y):
        assert int(y.min()) == 0 and int(y.max()) == 9
    assert set(d.train_y.tolist()) == set(range(10))
    assert d.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert d.source.endswith(BATCH_DIR)


def test_real_subset_pixels_match_raw_rows(cifar_subset_dir):
    """train_x[0] is row 0 of data_batch_1 reshaped, the last train image is the last row of
    data_batch_5 (batches concatenated in order), and test_x is test_batch."""
    batch_dir = cifar_subset_dir / BATCH_DIR

    def raw(name):  # our own trusted file, so the plain unpickler is fine here
        with open(batch_dir / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}

    d = load_cifar(cifar_subset_dir)
    b1, b5, tb = raw("data_batch_1"), raw("data_batch_5"), raw("test_batch")
    first = b1["data"][0]
    assert np.array_equal(d.train_x[0].numpy(), first.reshape(3, 32, 32))
    # channel planes: the first 1024 bytes are the red plane in row-major order
    assert np.array_equal(d.train_x[0, 0].numpy().ravel(), first[:1024])
    assert np.array_equal(d.train_x[0, 2, 31].numpy(), first[3072 - 32:])
    assert d.train_y[0].item() == b1["labels"][0]
    assert np.array_equal(d.train_x[-1].numpy(), b5["data"][-1].reshape(3, 32, 32))
    assert np.array_equal(d.test_x.numpy(), tb["data"].reshape(-1, 3, 32, 32))
    assert d.test_y.tolist() == list(tb["labels"])


def test_subset_takes_first_images(cifar_subset_dir, tiny_data):
    full = load_cifar(cifar_subset_dir)
    assert tiny_data.train_x.shape == (256, 3, 32, 32) and tiny_data.test_x.shape == (64, 3, 32, 32)
    assert torch.equal(tiny_data.train_x, full.train_x[:256])
    assert torch.equal(tiny_data.test_y, full.test_y[:64])
    assert tiny_data.fingerprint() != full.fingerprint()
    assert tiny_data.fingerprint() == full.subset(256, 64).fingerprint()


# ----------------------------------------------------------------------------- hand-made batches


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (4, False)])
@pytest.mark.parametrize("nested", [False, True])
def test_handmade_batches_any_row_count(tmp_path, protocol, bytes_keys, nested):
    root = tmp_path / "data"
    batch_dir = root / BATCH_DIR if nested else root
    names = [f"class_{i}" for i in range(10)]
    w = write_batch_dir(batch_dir, train_rows=(3, 1, 0, 5, 2), test_rows=4, protocol=protocol,
                        bytes_keys=bytes_keys, label_names=names)
    d = load_cifar(root)
    assert d.train_x.shape == (11, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    exp_x = np.concatenate([x for x, _ in w["train"]]).reshape(-1, 3, 32, 32)
    exp_y = sum((y for _, y in w["train"]), [])
    assert np.array_equal(d.train_x.numpy(), exp_x)
    assert d.train_y.tolist() == exp_y and d.train_y.dtype == torch.int64
    assert np.array_equal(d.test_x.numpy(), w["test"][0].reshape(-1, 3, 32, 32))
    assert d.test_y.tolist() == w["test"][1]
    assert d.classes == tuple(names)  # read from batches.meta (bytes decoded)


def test_handmade_without_meta_uses_default_classes(tmp_path):
    write_batch_dir(tmp_path, train_rows=(1, 1, 1, 1, 1), test_rows=1)
    assert load_cifar(tmp_path).classes == CLASSES


def test_subset_counts_on_handmade(tmp_path):
    write_batch_dir(tmp_path, train_rows=(4, 4, 4, 4, 4), test_rows=6)
    d = load_cifar(tmp_path, n_train=7, n_test=2)
    assert len(d.train_x) == 7 and len(d.train_y) == 7 and len(d.test_x) == 2


# ----------------------------------------------------------------------------- hostile and broken files


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    write_batch_dir(tmp_path / "d", train_rows=(1, 1, 1, 1, 1), test_rows=1)
    target = tmp_path / "d" / "data_batch_1"
    target.write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=2))
    with pytest.raises(DataError) as e:
        load_cifar(tmp_path / "d")
    msg = str(e.value)
    assert str(target) in msg
    assert f"{os.system.__module__}.system" in msg and "refused" in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_safe_unpickle_refuses_top_level_payload(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=protocol))
    with pytest.raises(DataError, match="refused global") as e:
        safe_unpickle(path)
    assert str(path) in str(e.value)
    assert not marker.exists()
    # sanity: the payload is real, the plain unpickler would have run it
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_safe_unpickle_refuses_other_globals(tmp_path):
    path = tmp_path / "eval.pkl"
    path.write_bytes(pickle.dumps({"x": (eval, ("1+1",))}))  # references builtins.eval
    with pytest.raises(DataError, match=r"builtins\.eval"):
        safe_unpickle(path)


@pytest.mark.parametrize("mangle", ["truncate", "garbage", "empty"])
def test_corrupt_file_names_it(tmp_path, mangle):
    write_batch_dir(tmp_path, train_rows=(5, 1, 1, 1, 1), test_rows=1)
    target = tmp_path / "data_batch_1"
    blob = target.read_bytes()
    target.write_bytes({"truncate": blob[: len(blob) // 2], "garbage": b"\x00not a pickle at all",
                        "empty": b""}[mangle])
    with pytest.raises(DataError) as e:
        load_cifar(tmp_path)
    assert str(target) in str(e.value)


def _write_single(path: Path, data, labels, protocol=4):
    path.write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=protocol))


@pytest.mark.parametrize("case,pattern", [
    ("short_rows", r"uint8 of shape \(N, 3072\)"),
    ("3d", r"uint8 of shape \(N, 3072\)"),
    ("float", r"uint8 of shape \(N, 3072\)"),
    ("label_10", r"labels outside 0\.\.9"),
    ("label_neg", r"labels outside 0\.\.9"),
    ("count", r"2 labels for 3 images"),
    ("missing_key", r"missing key 'labels'"),
    ("not_dict", r"expected a dict"),
])
def test_invalid_batch_content_names_file(tmp_path, case, pattern):
    write_batch_dir(tmp_path, train_rows=(3, 1, 1, 1, 1), test_rows=1)
    target = tmp_path / "data_batch_2"
    good = np.zeros((3, 3072), np.uint8)
    if case == "short_rows":
        _write_single(target, np.zeros((3, 3071), np.uint8), [0, 1, 2])
    elif case == "3d":
        _write_single(target, np.zeros((3, 3, 1024), np.uint8), [0, 1, 2])
    elif case == "float":
        _write_single(target, good.astype(np.float32), [0, 1, 2])
    elif case == "label_10":
        _write_single(target, good, [0, 10, 2])
    elif case == "label_neg":
        _write_single(target, good, [0, -1, 2])
    elif case == "count":
        _write_single(target, good, [0, 1])
    elif case == "missing_key":
        target.write_bytes(pickle.dumps({"data": good}))
    elif case == "not_dict":
        target.write_bytes(pickle.dumps([good, [0, 1, 2]]))
    with pytest.raises(DataError, match=pattern) as e:
        load_cifar(tmp_path)
    assert str(target) in str(e.value)


def test_missing_batch_file_names_it(tmp_path):
    write_batch_dir(tmp_path, train_rows=(1, 1, 1, 1, 1), test_rows=1)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="file not found") as e:
        load_cifar(tmp_path)
    assert str(tmp_path / "data_batch_3") in str(e.value)


def test_bad_meta_label_count(tmp_path):
    write_batch_dir(tmp_path, train_rows=(1, 1, 1, 1, 1), test_rows=1, label_names=["a", "b"])
    with pytest.raises(DataError, match="expected 10 label_names, got 2") as e:
        load_cifar(tmp_path)
    assert "batches.meta" in str(e.value)


def test_missing_or_unknown_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_cifar(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither"):
        load_cifar(tmp_path / "empty")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- ImageFolder / zip

# deliberately not in sorted order, so creation order != label order
FOLDER_CLASSES = ["zebra", "apple", "moth", "cat", "boat", "kiwi", "deer", "eel", "fox", "yak"]


def write_image_folder(root: Path, per_class: int = 2) -> dict:
    """train/<class>/*.png and test/<class>/*.png; returns {split: (images, labels)} in
    ImageFolder order (sorted classes, then sorted file names)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    order = sorted(FOLDER_CLASSES)
    for split in ("train", "test"):
        items = []
        for c in FOLDER_CLASSES:
            (root / split / c).mkdir(parents=True)
            for j in reversed(range(per_class)):  # write in reverse name order too
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"img{j}.png")
                items.append((c, f"img{j}.png", img))
        items.sort(key=lambda t: (t[0], t[1]))
        out[split] = (np.stack([im.transpose(2, 0, 1) for _, _, im in items]),
                      [order.index(c) for c, _, _ in items])
    return out


def _pairs(x, y) -> list[tuple[bytes, int]]:
    return sorted((np.ascontiguousarray(img).tobytes(), int(lab)) for img, lab in zip(x, y))


def _check_folder(d, expected):
    """Every image arrives pixel-exact with the label of its (sorted) class folder; the
    loader may reorder the images (compared as a multiset of (pixels, label) pairs)."""
    assert d.classes == tuple(sorted(FOLDER_CLASSES))
    for split, (x, y) in (("train", (d.train_x, d.train_y)), ("test", (d.test_x, d.test_y))):
        assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32)
        assert y.dtype == torch.int64 and sorted(y.tolist()) == [i // 2 for i in range(20)]
        assert _pairs(x.numpy(), y.tolist()) == _pairs(*expected[split]), split


def test_image_folder_tree_and_zip(tmp_path):
    tree = tmp_path / "folder"
    expected = write_image_folder(tree)
    from_tree = load_cifar(tree)
    _check_folder(from_tree, expected)

    for prefix in ("", "cifar_png/"):
        zpath = tmp_path / f"data{len(prefix)}.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            for p in sorted(tree.rglob("*.png")):
                z.write(p, prefix + p.relative_to(tree).as_posix())
        d = load_cifar(zpath)
        _check_folder(d, expected)
        assert d.source == str(zpath)
        # same order as the tree: a zip and its unpacked tree are the same data set
        assert torch.equal(d.train_x, from_tree.train_x) and torch.equal(d.test_y, from_tree.test_y)
        assert d.fingerprint() == from_tree.fingerprint()


def test_image_folder_errors(tmp_path):
    from PIL import Image

    tree = tmp_path / "folder"
    write_image_folder(tree, per_class=1)
    # a wrong-sized image is named in the error
    bad = tree / "test" / "cat" / "img0.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match="expected a 32x32 image") as e:
        load_cifar(tree)
    assert "test/cat/img0.png" in str(e.value)
    # nine classes only
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad)
    for p in (tree / "train" / "yak").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="10 class folders, found 9"):
        load_cifar(tree)
    # not a zip
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK but not really")
    with pytest.raises(DataError, match="not a valid zip") as e:
        load_cifar(fake)
    assert str(fake) in str(e.value)


# ----------------------------------------------------------------------------- augment / to_float


def test_augment_padding_only_at_borders():
    x = torch.ones(64, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    masks = set()
    for img in out:
        assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])  # same crop for all channels
        m = img[0] == 1
        rows, cols = m.any(1), m.any(0)
        assert torch.equal(m, rows[:, None] & cols[None, :])  # zeros form whole border rows/cols
        for line in (rows, cols):
            n = int(line.sum())
            assert 28 <= n <= 32  # at most 4 padded rows/cols
            # the ones are one contiguous run touching an edge
            assert bool(line[:n].all()) or bool(line[32 - n:].all())
        masks.add(m.numpy().tobytes())
    assert len(masks) > 5  # per image, not one crop for the whole batch


def test_augment_is_crop_and_flip_reproducible():
    x = torch.rand(32, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(8)))
    assert out.min() >= 0 and out.max() <= 1
    # reconstruct each image from the same draws: crop of the zero-padded image, maybe flipped
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 9, (32,), generator=g)
    dx = torch.randint(0, 9, (32,), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    assert 0 < int(flip.sum()) < 32
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(32):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        exp = torch.flip(crop, dims=[2]) if flip[i] else crop
        assert torch.equal(out[i], exp), i
        if dy[i] == 4 and dx[i] == 4:  # no shift: exactly the image or its mirror
            assert torch.equal(out[i], x[i].flip(2) if flip[i] else x[i])


def test_to_float():
    x = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32
    assert f.tolist() == [[0.0, pytest.approx(0.2), 1.0]]
    assert f[0, 2].item() == 1.0
    assert x.tolist() == [[0, 51, 255]]  # input untouched


def test_a_pack_of_a_jpeg_zip_gives_the_zips_images_byte_for_byte(tmp_path):
    from PIL import Image

    from kdp.datapack import pack, split_jpeg

    tree = tmp_path / "folder"
    write_image_folder(tree)
    zpath = tmp_path / "jpegs.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for i, p in enumerate(sorted(tree.rglob("*.png"))):
            buf = io.BytesIO()  # JPEGs (one header shared by all), one PNG that is kept whole
            Image.open(p).save(buf, format="PNG" if i == 3 else "JPEG", quality=90)
            z.writestr(p.relative_to(tree).with_suffix(".jpg").as_posix(), buf.getvalue())
    packed = pack(zpath, tmp_path / "data.kdpjpeg")
    assert packed.stat().st_size < zpath.stat().st_size
    a, b = load_cifar(zpath), load_cifar(packed)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.classes == b.classes and a.fingerprint() == b.fingerprint() and b.source == str(packed)
    head, scan = split_jpeg(zipfile.ZipFile(zpath).read("train/apple/img0.jpg"))
    assert head.startswith(b"\xff\xd8") and scan.endswith(b"\xff\xd9")
    assert split_jpeg(b"\x89PNG rest") == (b"\x89PNG rest", b"")
    (tmp_path / "junk.kdpjpeg").write_bytes(b"not an npz")
    with pytest.raises(DataError, match="junk.kdpjpeg: not a .kdpjpeg pack"):
        load_cifar(tmp_path / "junk.kdpjpeg")
