"""A JPEG image-folder zip repacked to a quarter of its size, byte for byte the same images.

The 60,000 files of `cifar10-jpeg.zip` (62 MB) share one 623-byte JPEG header (quantization and
Huffman tables): only the ~270 bytes of entropy-coded scan after it differ. A pack (`*.kdpjpeg`,
a numpy .npz without pickles) keeps each distinct header once and every file's scan, so each
file's exact bytes come back and decode to the same pixels: `load_cifar` reads a pack exactly as
it reads the zip. What for: a GPU lease's working tree is 64 MiB, the zip alone 59 MiB.

    python -m kdp.datapack ../shared/data/cifar10-jpeg.zip .gpu/cifar10.kdpjpeg
"""
from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np

from kdp.errors import DataError

SUFFIX = ".kdpjpeg"
SPLITS = ("train", "test")
SOS = b"\xff\xda"  # start of scan: the header is everything up to the end of this segment


def split_jpeg(blob: bytes) -> tuple[bytes, bytes]:
    """(header, rest) of a file; a file that is not a baseline JPEG is all header."""
    i = blob.find(SOS)
    if not blob.startswith(b"\xff\xd8") or i < 0 or i + 4 > len(blob):
        return blob, b""
    end = i + 2 + int.from_bytes(blob[i + 2:i + 4], "big")
    return blob[:end], blob[end:]


def read_zip(path: Path, split: str) -> list[tuple[str, str, bytes]]:
    """(class, file name, bytes) of every `<prefix>/<split>/<class>/<file>` in a zip."""
    out = []
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            parts = name.split("/")
            if split in parts and not name.endswith("/"):
                i = parts.index(split)
                if len(parts) == i + 3:  # <prefix>/<split>/<class>/<file>
                    out.append((parts[i + 1], parts[i + 2], z.read(name)))
    return out


def _items(zip_path: Path):
    """(split, class, file name, bytes) of every image, ImageFolder's order within each split."""
    return [(split, c, n, b) for split in SPLITS for c, n, b in sorted(read_zip(zip_path, split))]


def pack(zip_path: str | Path, out: str | Path) -> Path:
    """Write the pack of an image-folder zip (`train/<class>/*`, `test/<class>/*`) to `out`."""
    items = _items(Path(zip_path))
    if not items:
        raise DataError(f"{zip_path}: no train/<class>/* and test/<class>/* images found")
    classes = sorted({c for _, c, _, _ in items})
    headers: dict[bytes, int] = {}
    index, scans, lengths = [], [], []
    for _, _, _, blob in items:
        head, scan = split_jpeg(blob)
        index.append(headers.setdefault(head, len(headers)))
        scans.append(scan)
        lengths.append(len(scan))
    heads = list(headers)
    arrays = {"classes": np.array(classes), "split": np.array([SPLITS.index(s) for s, *_ in items], np.uint8),
              "label": np.array([classes.index(c) for _, c, _, _ in items], np.int16),
              "header_index": np.array(index, np.int32),
              "headers": np.frombuffer(b"".join(heads), np.uint8),
              "header_offsets": np.cumsum([0] + [len(h) for h in heads]).astype(np.int64),
              "scans": np.frombuffer(b"".join(scans), np.uint8),
              "scan_offsets": np.cumsum([0] + lengths).astype(np.int64)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(out)
    return out


def unpacked(path: str | Path) -> dict[str, list[tuple[str, str, bytes]]]:
    """split -> [(class, name, the file's original bytes)], in the order the pack keeps."""
    try:
        z = np.load(path, allow_pickle=False)
        classes, split, label = [str(c) for c in z["classes"]], z["split"], z["label"]
        idx, heads, hoff = z["header_index"], z["headers"].tobytes(), z["header_offsets"]
        scans, soff = z["scans"].tobytes(), z["scan_offsets"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a {SUFFIX} pack ({type(e).__name__}: {e})") from None
    out: dict[str, list] = {s: [] for s in SPLITS}
    for i in range(len(split)):
        h = idx[i]
        blob = heads[hoff[h]:hoff[h + 1]] + scans[soff[i]:soff[i + 1]]
        out[SPLITS[split[i]]].append((classes[label[i]], f"{len(out[SPLITS[split[i]]]):06d}", blob))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("zip", help="an image-folder zip: train/<class>/*.jpg and test/<class>/*.jpg")
    p.add_argument("out", help=f"the pack to write (*{SUFFIX})")
    a = p.parse_args(argv)
    out = pack(a.zip, a.out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (from {Path(a.zip).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
