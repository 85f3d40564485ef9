"""Before and after a GPU lease (docs/gpu.md): `prepare` fills .gpu, the folder the lease
carries; `keep` takes what a lease brought back: its carry for the next lease, its benchmark
JSON and log into docs/runs/.

    python benchmarks/lease.py prepare [--ray]            # then the device call in docs/gpu.md
    python benchmarks/lease.py keep /work/.device/...     # the call's files_at folder
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEASE = REPO / ".gpu"
ZIP = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"
WHEEL = "torchattacks==3.5.1"
TREE_MIB = 64  # what a lease's working tree may weigh, carried folders included
# Ray for the lease (`prepare --ray`): the GPU image's Python; Ray's requirements it lacks
# (KINDS.md lists what it has); what a job on one machine never loads (the Java jar, three
# libraries kdp does not import, the dashboard page's source maps: a dashboard, where its
# requirements are installed, refuses to start without the page itself); and the binaries
# whose symbol tables go. That takes Ray under what a lease carries (docs/gpu.md).
LEASE_PY = "3.12"
RAY_NEEDS = ("jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
RAY_DROP = ("jars", "rllib", "serve", "llm", "dashboard/client/build/**/*.map")
RAY_STRIP = ("_raylet.so", "core/src/ray/gcs/gcs_server", "core/src/ray/raylet/raylet")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def _tree_mib() -> float:
    """Tracked and untracked-not-ignored files, plus .gpu: what a device call sends."""
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    size = sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())
    size += sum(p.stat().st_size for p in LEASE.rglob("*") if p.is_file())
    return size / 2**20


def _download(dest: Path, *reqs: str, lease_python: bool = False) -> None:
    """Wheels from the registry, around this machine's pip configuration (its local CPU torch);
    with lease_python, the GPU image's CPython and platform."""
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": "/dev/null"}
    target = ["--python-version", LEASE_PY, "--implementation", "cp",
              *(a for p in PLATFORMS for a in ("--platform", p))] if lease_python else []
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *target,
                    "-d", str(dest), *reqs], check=True, env=env)


def trim_ray(site: Path) -> float:
    """Trims the Ray package in `site` (RAY_DROP, RAY_STRIP); returns the MiB it then weighs."""
    for pattern in RAY_DROP:
        for path in (site / "ray").glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    subprocess.run(["strip", "--strip-unneeded", *(str(site / "ray" / rel) for rel in RAY_STRIP)], check=True)
    return sum(p.stat().st_size for p in (site / "ray").rglob("*") if p.is_file()) / 2**20


def pack_ray(dest: Path) -> None:
    """`dest` (.tar.xz): a site folder with this machine's Ray version, trimmed, for the GPU
    image's Python, and the requirements the image lacks, at this machine's versions."""
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "whl", Path(tmp) / "site"
        _download(wheels, f"ray=={version('ray')}", *(f"{n}=={version(n)}" for n in RAY_NEEDS), lease_python=True)
        for whl in wheels.glob("*.whl"):  # a wheel is a zip of its site files
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
        mib = trim_ray(site)
        subprocess.run(["tar", "-cJf", str(dest), "-C", str(site), "."], check=True, env={**os.environ, "XZ_OPT": "-T0"})
    print(f"{dest.name}: Ray {version('ray')} for CPython {LEASE_PY}, {mib:.0f} MiB trimmed, "
          f"{dest.stat().st_size / 2**20:.1f} MiB packed")


def prepare(ray: bool = False) -> None:
    sys.path.insert(0, str(REPO))
    from kdp.datapack import pack

    LEASE.mkdir(exist_ok=True)
    if not (LEASE / "cifar10.kdpjpeg").is_file():
        pack(ZIP, LEASE / "cifar10.kdpjpeg")
    if not list((LEASE / "whl").glob("torchattacks-*.whl")):
        _download(LEASE / "whl", WHEEL)
    if ray and not (LEASE / "ray.tar.xz").is_file():
        pack_ray(LEASE / "ray.tar.xz")
    elif not ray and (LEASE / "ray.tar.xz").is_file():
        (LEASE / "ray.tar.xz").unlink()  # later leases resume the run and leave Ray's room to the carry
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
    """The carry into .gpu/carry (replacing the last); gpu.json, lease.log and ray.log into
    docs/runs, named by the commit (the GPU is named inside them)."""
    carry = LEASE / "carry"
    if (files_at / "carry.json").is_file():
        shutil.rmtree(carry, ignore_errors=True)
        carry.mkdir(parents=True)
        for p in [files_at / "carry.json", *files_at.glob("*.tgz.*")]:
            shutil.copy(p, carry / p.name)
        print(f"carry kept in {carry}")
    sha = (LEASE / "commit").read_text().strip()[:7] if (LEASE / "commit").is_file() else "unknown"
    for name in ("gpu.json", "lease.log", "ray.log"):
        if (files_at / name).is_file():
            dest = REPO / "docs" / "runs" / f"{Path(name).stem}-lease-{sha}{Path(name).suffix}"
            shutil.copy(files_at / name, dest)
            print(f"{name} kept as {dest.relative_to(REPO)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="fill .gpu: data pack, wheel, commit; check the tree's size")
    pr.add_argument("--ray", action="store_true", help="also a trimmed Ray (.gpu/ray.tar.xz), for the first "
                    "lease's Ray check; without it, a Ray packed before is removed")
    k = sub.add_parser("keep", help="keep what a lease brought back")
    k.add_argument("files_at", type=Path, help="the device call's files_at folder")
    a = p.parse_args(argv)
    prepare(a.ray) if a.cmd == "prepare" else keep(a.files_at)


if __name__ == "__main__":
    main()
