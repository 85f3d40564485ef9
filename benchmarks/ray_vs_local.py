"""The README's two ways to run a preset's pipeline (default: smoke), back to back on this machine: `kdp run`
(in-process executor) and `jobs/pipeline.py` (Ray executor on a fresh local Ray). Writes wall
times, their ratio, console line counts and per-stage times (from the run's events) to JSON.

    python benchmarks/ray_vs_local.py --data-dir ../shared/data/cifar10-subset \\
        --json docs/runs/ray_vs_local-cpu2.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdp.events import read_events

REPO = Path(__file__).resolve().parents[1]


def stage_times(run_dir: Path) -> dict:
    """{stage: {"seconds": s, "start": offset from the first event}} of each finished stage."""
    events = read_events(run_dir)
    t0 = events[0]["time"]
    return {e["stage"]: {"seconds": round(e["seconds"], 1), "start": round(e["start"] - t0, 1)}
            for e in events if e["status"] == "finished"}


def timed(cmd: list[str], run_dir: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = (proc.stdout + proc.stderr).splitlines()
    repeats = sum(a == b for a, b in zip(lines, lines[1:]))
    return {"cmd": " ".join(cmd), "wall_seconds": round(wall, 1), "console_lines": len(lines),
            "repeated_lines": repeats, "stages": stage_times(run_dir), "console": lines}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 location (e.g. ../shared/data/cifar10-subset)")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--preset", default="smoke", help="preset to run (default: smoke)")
    p.add_argument("--ray-args", default="", help="extra jobs/pipeline.py flags, e.g. '--cpus-per-worker 2'")
    p.add_argument("--skip-local", type=float, metavar="SECONDS",
                   help="do not run kdp run; for exploring Ray flags only (no ratio is recorded)")
    args = p.parse_args(argv)
    py, data = sys.executable, str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="kdp-bench-") as tmp:
        local_out, ray_out = Path(tmp) / "local", Path(tmp) / "ray"
        local = timed([py, "-m", "kdp.cli", "run", "--preset", args.preset, "--data-dir", data,
                       "--out", str(local_out)], local_out / args.preset) if args.skip_local is None else {
            "wall_seconds": args.skip_local, "console_lines": None, "repeated_lines": None, "stages": {},
            "note": "not run (--skip-local)"}
        ray = timed([py, "jobs/pipeline.py", "--preset", args.preset, "--data-dir", data, "--out", str(ray_out),
                     *args.ray_args.split()], ray_out / args.preset)
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "preset": args.preset,
              "local": local, "ray": ray, "ratio_ray_over_local": round(ray["wall_seconds"] / local["wall_seconds"], 3)}
    print(json.dumps({k: v for k, v in result.items() if k not in ("local", "ray")} | {
        "local_wall": local["wall_seconds"], "ray_wall": ray["wall_seconds"],
        "ray_console_lines": ray["console_lines"], "ray_repeated_lines": ray["repeated_lines"]}, indent=2))
    if args.json and args.skip_local is None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
