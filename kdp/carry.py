"""A run carried between short machine leases: what a time-limited `kdp run` made, packed into a
few files small enough to come back, and unpacked under the output root of the next lease.

A lease gives back at most a few files of 16 MiB each, so the pack holds only what the next
lease cannot make again cheaply: the run's directory (config, events, logs, finished
checkpoints, the training state of unfinished stages and the rows of finished evaluation
shards). The caches (training and evaluation AEs, hundreds of MB at paper scale) are left
out: they are crafted again from the classifier, under the same cache key.

    python -m kdp.carry pack runs paper $OUT          # on the leased machine, after the run
    python -m kdp.carry unpack .gpu/carry runs        # on the next one, before it
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

from kdp.errors import CheckpointError

MANIFEST = "carry.json"
CHUNK_MIB = 15.0


def _members(run_dir: Path) -> list[Path]:
    """The run's files, less the training state of stages whose checkpoint is finished."""
    out = []
    for p in sorted(run_dir.rglob("*")):
        if not p.is_file() or p.name.endswith(".lock"):
            continue
        rel = p.relative_to(run_dir)
        if rel.parts[0] == "state" and p.suffix == ".pt" and (run_dir / p.stem / "checkpoint.json").is_file():
            continue
        out.append(p)
    return out


def pack(root: str | Path, run: str, dest: str | Path, chunk_mib: float = CHUNK_MIB) -> dict:
    """Write `<run>.tgz.000`, `.001`, ... (each at most chunk_mib) and carry.json into `dest`."""
    root, dest = Path(root), Path(dest)
    run_dir = root / run
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run to pack")
    buf = io.BytesIO()
    files = _members(run_dir)
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for p in files:
            tar.add(p, arcname=p.relative_to(root).as_posix())
    blob, step = buf.getvalue(), int(chunk_mib * 2**20)
    dest.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i in range(0, max(len(blob), 1), step):
        name = f"{run}.tgz.{i // step:03d}"
        (dest / name).write_bytes(blob[i:i + step])
        chunks.append({"name": name, "sha256": hashlib.sha256(blob[i:i + step]).hexdigest()})
    largest = sorted(files, key=lambda p: -p.stat().st_size)[:5]
    manifest = {"run": run, "bytes": len(blob), "files": len(files), "chunks": chunks,
                "largest": {p.relative_to(root).as_posix(): p.stat().st_size for p in largest}}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def unpack(src: str | Path, root: str | Path) -> dict:
    """Check each chunk's sha256, then extract the run under `root` (names kept inside it)."""
    src, root = Path(src), Path(root)
    try:
        manifest = json.loads((src / MANIFEST).read_text())
        parts = []
        for c in manifest["chunks"]:
            data = (src / Path(c["name"]).name).read_bytes()
            if hashlib.sha256(data).hexdigest() != c["sha256"]:
                raise CheckpointError(f"{src / c['name']}: sha256 differs from {MANIFEST}'s")
            parts.append(data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{src}: not a complete carry ({type(e).__name__}: {e})") from None
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(parts)), mode="r:gz") as tar:
        tar.extractall(root, filter="data")  # refuses absolute names, '..' and links out of root
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdp.carry", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="pack ROOT/RUN into DEST")
    a.add_argument("root"), a.add_argument("run"), a.add_argument("dest")
    a.add_argument("--chunk-mib", type=float, default=CHUNK_MIB, help=f"largest file (default: {CHUNK_MIB})")
    u = sub.add_parser("unpack", help="unpack what SRC holds under ROOT")
    u.add_argument("src"), u.add_argument("root")
    args = p.parse_args(argv)
    from kdp.commands import run_command

    return run_command("kdp.carry", _command, args)


def _command(args) -> None:
    if args.cmd == "pack":
        m = pack(args.root, args.run, args.dest, args.chunk_mib)
        print(f"packed {m['files']} files of {args.root}/{args.run}: {m['bytes'] / 2**20:.1f} MiB "
              f"in {len(m['chunks'])} chunk(s)")
    else:
        m = unpack(args.src, args.root)
        print(f"unpacked {m['run']} ({m['files']} files) under {args.root}")


if __name__ == "__main__":
    raise SystemExit(main())
