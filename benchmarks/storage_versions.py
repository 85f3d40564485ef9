"""`kdp run --preset tiny` into a bucket (a real S3 server, tests/s3_server.py), an older checkout
beside this one, alternating (old, new, new, old), one thread: wall time and the objects and bytes
each run leaves in the bucket. Prints JSON.

    git worktree add /tmp/old 86d62fa
    python benchmarks/storage_versions.py --before /tmp/old --data-dir ../shared/data/cifar10-subset
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's S3 server

import pyarrow.fs as pafs  # noqa: E402

from s3_server import S3Server  # noqa: E402


def one_run(server: S3Server, tree: str, data: str, prefix: str, scratch: Path) -> dict:
    env = {**os.environ, **server.env, "KDP_SCRATCH": str(scratch), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdp.cli", "run", "--preset", "tiny", "--data-dir", data, "--out",
           f"s3://abtest/{prefix}", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)  # cwd's kdp is imported
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    objects = [f for f in server.admin().get_file_info(pafs.FileSelector(f"abtest/{prefix}", recursive=True))
               if f.type == pafs.FileType.File]
    return {"wall_s": round(wall, 1), "objects": len(objects), "bytes": sum(f.size for f in objects)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the older checkout (a git worktree)")
    p.add_argument("--data-dir", required=True, help="CIFAR-10 (the exact subset)")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    server = S3Server(tmp / "s3", buckets=("abtest",))
    out: dict[str, list] = {}
    try:
        for i, (name, tree) in enumerate([("before", a.before), ("after", str(REPO)), ("after", str(REPO)),
                                          ("before", a.before)]):
            out.setdefault(name, []).append(one_run(server, tree, a.data_dir, f"r{i}", tmp / f"scratch{i}"))
            print(name, out[name][-1], file=sys.stderr, flush=True)
    finally:
        server.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
