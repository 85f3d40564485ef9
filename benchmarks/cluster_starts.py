"""Start and stop the simulated cluster of tests/cluster_sim.py again and again, in the order CI
runs the cluster tests, to catch a worker node that does not start (a `ray start` that waited
30 s on the head's GCS, once in CI, 2026-12-05). Each round: a 1-GPU cluster used by a driver in
this process (as test_gpu_tasks_get_a_fresh_worker_each), then the 3-worker cluster with a
scratch directory of each node's own (as the bucket test), with the test S3 server running.
A failure keeps the cluster's temp dir, `ss -tanp` and the process table under --keep.

    .venv/bin/python benchmarks/cluster_starts.py --rounds 25 --keep /tmp/starts
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cluster_sim import SimCluster, sim_cluster  # noqa: E402
from conftest import short_temp_dir  # noqa: E402
from s3_server import S3Server  # noqa: E402


def _pid() -> int:
    return os.getpid()


def _driver_round() -> None:
    import ray

    with sim_cluster(workers=1, gpus=1) as c:
        ray.init(address=c.address, log_to_driver=False)
        try:
            task = ray.remote(num_gpus=1, max_calls=1)(_pid)
            [ray.get(task.remote(), timeout=120) for _ in range(3)]
        finally:
            ray.shutdown()


def _keep(temp: Path, keep: Path, port: int) -> None:
    keep.mkdir(parents=True)
    for name, cmd in (("ss.txt", ["ss", "-tanp"]), ("ps.txt", ["ps", "-eo", "pid,ppid,pgid,stat,etime,args"])):
        (keep / name).write_text(subprocess.run(cmd, capture_output=True, text=True).stdout)
    shutil.copytree(temp, keep / "temp", symlinks=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("sockets"))
    (keep / "error.txt").write_text(f"{traceback.format_exc()}\nGCS port {port}\n")


def _private_round(base: Path, keep: Path) -> bool:
    scratch = base / "scratch"
    scratch.mkdir(exist_ok=True)
    with short_temp_dir("kdp-sim-") as temp:
        c = SimCluster(temp)
        try:
            c.start()
            for _ in range(3):
                c.add_worker(hide=scratch)
            return True
        except RuntimeError:
            _keep(temp, keep, c.port)
            return False
        finally:
            c.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=25, help="rounds of both clusters (about 35 s each on 2 cores)")
    p.add_argument("--keep", type=Path, required=True, help="a new directory for the servers and any failure")
    args = p.parse_args()
    args.keep.mkdir(parents=True)
    server, fails = S3Server(args.keep / "s3"), 0
    try:
        for k in range(args.rounds):
            t0 = time.monotonic()
            _driver_round()
            ok = _private_round(args.keep, args.keep / f"fail{k}")
            fails += not ok
            print(f"round {k}: {'ok' if ok else 'FAILED'} {time.monotonic() - t0:.1f} s, {fails} failed", flush=True)
    finally:
        server.stop()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
