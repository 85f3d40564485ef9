"""CIFAR-10 loading: the python-pickle layout (full or subset), ImageFolder/zip JPEGs, or a download.

Everything is held in memory as uint8 tensors of shape (N, 3, 32, 32); models see
float images in [0, 1] via `to_float`. Pickles are read with a restricted unpickler,
since `pickle.load` on a downloaded file can execute arbitrary code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdp.datapack import SUFFIX, read_zip, unpacked
from kdp.locks import held
from kdp.errors import DataError  # noqa: F401 (re-exported)

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_ROOT = Path.home() / ".cache" / "kdp" / "data"


# What a CIFAR batch pickle may reference: numpy array reconstruction and nothing else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "bytes"),
    ("__builtin__", "bytes"),  # protocol < 3 writes b"" as __builtin__.bytes(); checked before name fixing
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(path: Path) -> dict:
    """Load a CIFAR batch pickle without executing code; errors name the file."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a safe CIFAR pickle ({e})") from None
    except Exception as e:  # truncated or garbage files raise many types
        raise DataError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (uint8 images (N,3,32,32), int64 labels (N,))."""
    d = safe_unpickle(path)
    for key in ("data", "labels"):
        if key not in d:
            raise DataError(f"{path}: missing key {key!r} (has {sorted(d)})")
    data, labels = d["data"], np.asarray(d["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@dataclass
class Cifar:
    """CIFAR-10 in memory: uint8 images (N,3,32,32) and int64 labels, plus where it came from."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    classes: tuple[str, ...] = CLASSES

    def subset(self, n_train: int | None, n_test: int | None) -> "Cifar":
        """The first n_train / n_test images (None keeps all)."""
        return Cifar(self.train_x[:n_train], self.train_y[:n_train],
                     self.test_x[:n_test], self.test_y[:n_test], self.source, self.classes)

    def fingerprint(self) -> str:
        """sha256 of the training images and labels: part of the AE cache key."""
        h = hashlib.sha256()
        h.update(self.train_x.numpy().tobytes())
        h.update(self.train_y.numpy().tobytes())
        return h.hexdigest()


def _find_batch_dir(root: Path) -> Path | None:
    for cand in (root, root / BATCH_DIR):
        if (cand / TEST_FILE).exists() or (cand / "data_batch_1").exists():
            return cand
    return None


def load_batches(batch_dir: Path) -> Cifar:
    """Read data_batch_1..5 and test_batch from the python layout."""
    parts = [read_batch(batch_dir / f) for f in TRAIN_FILES]
    test_x, test_y = read_batch(batch_dir / TEST_FILE)
    classes = CLASSES
    if (batch_dir / "batches.meta").exists():
        names = safe_unpickle(batch_dir / "batches.meta").get("label_names")
        if names is not None:
            if len(names) != 10:
                raise DataError(f"{batch_dir / 'batches.meta'}: expected 10 label_names, got {len(names)}")
            classes = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
    tx = np.concatenate([p[0] for p in parts])
    ty = np.concatenate([p[1] for p in parts])
    return Cifar(torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(test_x),
                 torch.from_numpy(test_y), str(batch_dir), classes)


def _decode(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        img = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    except Exception as e:
        raise DataError(f"{name}: cannot decode image ({e})") from None
    if img.shape != (32, 32, 3):
        raise DataError(f"{name}: expected a 32x32 image, got {img.shape[1]}x{img.shape[0]}")
    return img.transpose(2, 0, 1)


def _stack_split(items: list[tuple[str, str, bytes]], split: str, where: str):
    """items: (class name, file name, bytes) of one split -> uint8 images, labels."""
    classes = sorted({c for c, _, _ in items})
    if len(classes) != 10:
        raise DataError(f"{where}: {split}/ must hold 10 class folders, found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    items = sorted(items, key=lambda t: (t[0], t[1]))  # ImageFolder's order
    x = np.stack([_decode(b, f"{where}:{split}/{c}/{n}") for c, n, b in items])
    y = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y), tuple(classes)


def _read_tree(root: Path, split: str) -> list[tuple[str, str, bytes]]:
    files = sorted(p for p in (root / split).glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [(p.parent.name, p.name, p.read_bytes()) for p in files]


def load_image_folder(root: Path) -> Cifar:
    """Read `train/<class>/*.jpg` and `test/<class>/*.jpg` from a directory, a .zip of one or its
    kdp.datapack pack (the same bytes).

    Classes are numbered in sorted folder order (as torchvision's ImageFolder does), and
    each split is put in a fixed shuffled order (seed 0 train, 1 test)."""
    try:
        if root.suffix == SUFFIX:  # kdp.datapack: the same files' bytes, repacked
            packed = unpacked(root)
            train, test = packed["train"], packed["test"]
        else:
            read = read_zip if root.suffix == ".zip" else _read_tree
            train, test = read(root, "train"), read(root, "test")
    except zipfile.BadZipFile:
        raise DataError(f"{root}: not a valid zip file") from None
    if not train or not test:
        raise DataError(f"{root}: no train/<class>/*.jpg and test/<class>/*.jpg images found")
    tx, ty, classes = _stack_split(train, "train", str(root))
    vx, vy, _ = _stack_split(test, "test", str(root))
    # Files come sorted by class; a fixed shuffle makes "the first n" a mixed subset.
    pt = torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))
    pv = torch.randperm(len(vy), generator=torch.Generator().manual_seed(1))
    return Cifar(tx[pt], ty[pt], vx[pv], vy[pv], str(root), classes)


def download_cifar(root: Path = DEFAULT_ROOT) -> Path:
    """Fetch CIFAR-10 the torchvision way (needs internet); returns the batch directory. One
    process downloads, under a lock; the others wait, then find it complete (md5-checked)."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    with held(root / ".download.lock", "downloading CIFAR-10"):
        CIFAR10(str(root), train=True, download=True)
    return root / BATCH_DIR


def load_cifar(data_dir: str | Path | None, n_train: int | None = None, n_test: int | None = None) -> Cifar:
    """Load CIFAR-10 from the python layout, an ImageFolder tree or zip, or (None) a download;
    any of the first three may be in a bucket (`s3://...`: fetched once per node, kdp.storage)."""
    from kdp.storage import is_uri

    if data_dir is not None and is_uri(data_dir):
        return dataclasses.replace(load_cifar(fetch_data(str(data_dir)), n_train, n_test), source=str(data_dir))
    if data_dir is None:
        data = load_batches(download_cifar())
    else:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise DataError(f"{root}: data path does not exist")
        batch_dir = None if root.suffix in (".zip", SUFFIX) else _find_batch_dir(root)
        if batch_dir is not None:
            data = load_batches(batch_dir)
        elif root.suffix in (".zip", SUFFIX) or (root / "train").is_dir():
            data = load_image_folder(root)
        else:
            raise DataError(f"{root}: neither a {BATCH_DIR}/ layout nor train/ and test/ image folders")
    return data.subset(n_train, n_test)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (a new tensor; the input is left alone)."""
    return x.to(torch.float32) / 255.0


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding 4 and horizontal flip, per image, on a float batch."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (b,), generator=generator).to(x.device)
    ar = torch.arange(32, device=x.device)
    rows = (dy[:, None] + ar)[:, None, :, None]  # (B,1,32,1)
    cols = (dx[:, None] + ar)[:, None, None, :]  # (B,1,1,32)
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[bidx, cidx, rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class PurifierData:
    """The training set's clean images, labels and (optionally) their cached AEs, on one device:
    what a purifier's training step draws its batches from."""

    def __init__(self, data: Cifar, device: torch.device, aes: torch.Tensor | None = None):
        self.x = to_float(data.train_x).to(device)
        self.y = data.train_y.to(device)
        self.x_adv = None if aes is None else aes.to(device)
        if self.x_adv is not None and len(self.x_adv) != len(self.x):
            raise DataError(f"{len(self.x_adv)} training AEs for {len(self.x)} training images")

    def __len__(self):
        return len(self.x)

    def batch(self, idx: torch.Tensor, acc=None):
        """(clean images, labels, AEs or None) of an index batch, in the memory format of acc
        (a kdp.accel.Accel), if given."""
        idx = idx.to(self.x.device)
        fmt = acc.images if acc is not None else (lambda t: t)
        return fmt(self.x[idx]), self.y[idx], None if self.x_adv is None else fmt(self.x_adv[idx])


# ---- a dataset in a bucket

def fetch_data(uri: str) -> Path:
    """A dataset in a bucket (a .zip object, or a prefix such as .../cifar-10-batches-py/),
    downloaded once per node into $KDP_SCRATCH/data/<bucket>/<prefix> under a lock. Each
    file's size and sha256 go into a local manifest written last; a later use checks the local
    files against it (and against the bucket's sizes) before trusting them, else downloads
    again. Returns the local path (the file, or the directory)."""
    import json

    import pyarrow.fs as pafs

    from kdp.bucket import BucketStorage
    from kdp.bucket_io import MANIFEST, endpoint, inside, scratch
    from kdp.files import atomic_path
    from kdp.errors import NotFoundError

    store = BucketStorage(uri, scratch() / "data")
    info = store._call(store.fs.get_file_info, store.base)
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(f"--data-dir {uri}: no such object or prefix at {endpoint()}")
    listing = [info] if info.type == pafs.FileType.File else [
        f for f in store._call(store.fs.get_file_info, pafs.FileSelector(store.base, recursive=True))
        if f.type == pafs.FileType.File]
    names = {f.path[len(store.base):].lstrip("/") or Path(store.base).name: f for f in listing}
    top = store.root.parent if info.type == pafs.FileType.File else store.root
    manifest = top / (f".{store.root.name}{MANIFEST}" if info.type == pafs.FileType.File else MANIFEST)
    top.mkdir(parents=True, exist_ok=True)
    for name in names:
        inside(top, name, uri)
    with held(top / f".{store.root.name}.fetch.lock", f"fetching {uri}"):
        if not _fetched(top, manifest, names):
            files = {}
            for name, f in sorted(names.items()):  # [size, sha256 hashed as it streams, the object's time]
                files[name] = [f.size, store._download(f.path, top / name), f.mtime_ns]
            with atomic_path(manifest) as tmp:  # last: the local copy is complete
                tmp.write_text(json.dumps({"uri": uri, "files": files}, sort_keys=True))
    return store.root


def _fetched(top: Path, manifest: Path, names: dict) -> bool:
    """Does the local copy hold every listed file, of the bucket's size and time (an object
    replaced by one of the same size is fetched again) and the sha256 recorded?"""
    from kdp.bucket_dirs import read_local
    from kdp.files import file_sha256

    files = (read_local(manifest) or {}).get("files", {})
    return bool(files) and set(files) == set(names) and all(
        files[n][0] == f.size and files[n][2:] == [f.mtime_ns] and (top / n).is_file()
        and (top / n).stat().st_size == f.size and file_sha256(top / n) == files[n][1] for n, f in names.items())
