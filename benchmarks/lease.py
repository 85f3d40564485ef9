"""Before and after a GPU lease (docs/gpu.md): `prepare` fills .gpu, the folder the lease
carries; `keep` takes what a lease brought back: its carry for the next lease, its benchmark
JSON and log into docs/runs/.

    python benchmarks/lease.py prepare                    # then the device call in docs/gpu.md
    python benchmarks/lease.py keep /work/.device/...     # the call's files_at folder
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEASE = REPO / ".gpu"
ZIP = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"
WHEEL = "torchattacks==3.5.1"
TREE_MIB = 64  # what a lease's working tree may weigh, carried folders included


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def _tree_mib() -> float:
    """Tracked and untracked-not-ignored files, plus .gpu: what a device call sends."""
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    size = sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())
    size += sum(p.stat().st_size for p in LEASE.rglob("*") if p.is_file())
    return size / 2**20


def prepare() -> None:
    sys.path.insert(0, str(REPO))
    from kdp.datapack import pack

    LEASE.mkdir(exist_ok=True)
    if not (LEASE / "cifar10.kdpjpeg").is_file():
        pack(ZIP, LEASE / "cifar10.kdpjpeg")
    if not list((LEASE / "whl").glob("torchattacks-*.whl")):
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": "/dev/null"}
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(LEASE / "whl"), WHEEL], check=True, env=env)
    dirty = "+dirty" if _git("status", "--porcelain", "--untracked-files=no") else ""
    (LEASE / "commit").write_text(_git("rev-parse", "HEAD") + dirty + "\n")
    carried = (LEASE / "carry" / "carry.json").is_file()
    mib = _tree_mib()
    print(f".gpu ready: commit {(LEASE / 'commit').read_text().strip()}, "
          f"{'a carry from the last lease' if carried else 'no carry (the run starts afresh)'}; "
          f"the lease's tree weighs {mib:.1f} MiB of {TREE_MIB}")
    if mib > TREE_MIB:
        raise SystemExit(f"lease: the tree is {mib:.1f} MiB, over {TREE_MIB}: the device call would be refused")


def keep(files_at: Path) -> None:
    """The carry into .gpu/carry (replacing the last); gpu.json and lease.log into docs/runs."""
    carry = LEASE / "carry"
    if (files_at / "carry.json").is_file():
        shutil.rmtree(carry, ignore_errors=True)
        carry.mkdir(parents=True)
        for p in [files_at / "carry.json", *files_at.glob("*.tgz.*")]:
            shutil.copy(p, carry / p.name)
        print(f"carry kept in {carry}")
    sha = (LEASE / "commit").read_text().strip()[:7] if (LEASE / "commit").is_file() else "unknown"
    for name in ("gpu.json", "lease.log"):
        if (files_at / name).is_file():
            dest = REPO / "docs" / "runs" / f"{Path(name).stem}-h200-{sha}{Path(name).suffix}"
            shutil.copy(files_at / name, dest)
            print(f"{name} kept as {dest.relative_to(REPO)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="fill .gpu: data pack, wheel, commit; check the tree's size")
    k = sub.add_parser("keep", help="keep what a lease brought back")
    k.add_argument("files_at", type=Path, help="the device call's files_at folder")
    a = p.parse_args(argv)
    prepare() if a.cmd == "prepare" else keep(a.files_at)


if __name__ == "__main__":
    main()
