"""Ray Train overhead and data-parallel scaling of one kdp stage; prints one JSON object.

    python benchmarks/ray_overhead.py --data-dir ../shared/data/cifar10-subset

Trains the same NT-teacher stage (CAE, Adam, batch 128, the 5085-image subset) three ways:
the plain core loop in this process; a Ray Train TorchTrainer with 1 worker holding all
CPUs; and one with 2 workers (DDP, gloo on CPU) splitting them. Seconds per epoch are taken
from the stage's own epoch events (first epoch start to last epoch end, so Ray's start-up
is reported separately as `ray_startup_s`).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from kdp.events import read_events


def _epoch_span(run_dir: Path, stage: str, epochs: int) -> float:
    events = read_events(run_dir)
    ev = [e for e in events if e["stage"] == stage and e.get("rank", 0) == 0]
    start = min(e["time"] for e in ev if e["status"] == "epoch_start")
    end = max(e["time"] for e in ev if e["status"] == "epoch_end")
    return (end - start) / epochs


def bench(args) -> dict:
    from kdp.config import DataConfig, Runtime, TeacherConfig
    from kdp.pipeline_config import PipelineConfig
    from kdp.data import load_cifar
    from kdp.distributed.config import ScaleConfig
    from kdp.graph import Stage
    from kdp.scheduler import Run, run_graph
    from kdp.stages.common import fit_local
    from kdp.stages.purifier import teacher_recipe

    cfg = TeacherConfig(kind="nt", depth=args.depth, width=args.width, epochs=args.epochs)
    data_cfg = DataConfig(data_dir=args.data_dir)
    data = load_cifar(args.data_dir)
    n, cpus = len(data.train_y), args.cpus
    root = Path(tempfile.mkdtemp(prefix="kdp-bench-"))
    torch.set_num_threads(cpus)
    t0 = time.perf_counter()
    fit_local(teacher_recipe, cfg, {}, data, root / "plain", Runtime(device="cpu", progress=False))
    plain = json.loads((root / "plain" / "checkpoint.json").read_text())["metrics"]["history"]
    plain_epoch = sum(h["seconds"] for h in plain) / len(plain)
    plain_wall = time.perf_counter() - t0

    import ray

    from kdp.distributed.config import TRAIN_ENV
    from kdp.distributed.executor import RayExecutor

    for k, v in TRAIN_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stage = Stage("teacher_nt", "train", "teacher", cfg)
    out = {}
    for workers in (1, 2):
        run_dir = root / f"ray{workers}"
        scale = ScaleConfig(num_workers=workers, cpus_per_worker=cpus / workers)
        t0 = time.perf_counter()
        run = Run(PipelineConfig(data=data_cfg), data, Runtime(progress=False), run_dir,
                  lambda s, inputs: run_dir / s.name, graph=[stage], storage=root / "storage", log=lambda *_: None)
        run_graph(run, RayExecutor(scale))
        wall = time.perf_counter() - t0
        epoch = _epoch_span(run_dir, "teacher_nt", cfg.epochs)
        out[workers] = {"epoch_s": epoch, "wall_s": wall, "img_s": n / epoch,
                        "startup_s": wall - epoch * cfg.epochs}
    ray.shutdown()
    return {
        "stage": f"NT teacher, CAE depth {cfg.depth} width {cfg.width}, {n} images/epoch, batch 128",
        "cpus": cpus, "torch": torch.__version__, "epochs": cfg.epochs,
        "plain_epoch_s": round(plain_epoch, 2), "plain_wall_s": round(plain_wall, 2),
        "ray_1worker_epoch_s": round(out[1]["epoch_s"], 2), "ray_1worker_wall_s": round(out[1]["wall_s"], 2),
        "ray_startup_s": round(out[1]["startup_s"], 2),
        "ray_vs_plain_epoch_ratio": round(out[1]["epoch_s"] / plain_epoch, 3),
        "ray_1worker_img_s": round(out[1]["img_s"], 1), "ray_2worker_img_s": round(out[2]["img_s"], 1),
        "speedup_2_vs_1_workers": round(out[2]["img_s"] / out[1]["img_s"], 3),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 (e.g. ../shared/data/cifar10-subset)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    p.add_argument("--depth", type=int, default=15, help="CAE depth (default: 15, the paper's)")
    p.add_argument("--width", type=int, default=16, help="CAE width (default: 16)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for each setting (default: all)")
    print(json.dumps(bench(p.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
