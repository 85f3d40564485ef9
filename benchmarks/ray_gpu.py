"""Ray on a GPU lease (docs/gpu.md, issue 25 step 6): one Ray Train run of one worker whose
process group all-reduces a tensor on the worker's device (NCCL on a GPU, gloo elsewhere), then
one line of JSON saying what ran and which Ray did it. benchmarks/lease.sh runs it with the
trimmed Ray of `benchmarks/lease.py prepare --ray`, before `jobs/pipeline.py --use-gpu`.
(A one-worker kdp stage never calls a collective, so the job alone would not show NCCL working.)

    python benchmarks/ray_gpu.py [--storage DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def loop(config: dict) -> None:
    import torch
    import torch.distributed as dist
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    x = torch.full((1024,), float(ray.train.get_context().get_world_rank() + 1), device=device)
    dist.all_reduce(x)
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None
    metrics = {"backend": dist.get_backend(), "device": str(device), "world": dist.get_world_size(),
               "sum": float(x[0]), "nccl": nccl, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps the metrics of checkpoints only
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--storage", help="Ray Train's storage path (default: a temporary folder, removed afterwards)")
    a = p.parse_args(argv)
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.time()
    cuda = torch.cuda.is_available()
    ray.init(include_dashboard=False, log_to_driver=True)
    try:
        with tempfile.TemporaryDirectory(prefix="kdp-ray-gpu-") as tmp:  # Train's run files go with it
            result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=cuda),
                                  torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
                                  run_config=RunConfig(name="ray_gpu", storage_path=a.storage or tmp)).fit()
        print(json.dumps({**result.metrics, "ray": ray.__version__, "ray_file": ray.__file__,
                          "seconds": round(time.time() - t0, 1)}))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
