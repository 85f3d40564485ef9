"""Ray job: the whole kdp pipeline on a Ray cluster (or an embedded local Ray).

    python jobs/pipeline.py --preset smoke --data-dir ../shared/data/cifar10-subset --out runs
    ray job submit --working-dir . -- python jobs/pipeline.py --preset paper --use-gpu \\
        --num-workers 4 --data-dir /data/cifar --out /shared/kdp-runs

Without --address or RAY_ADDRESS it starts a local Ray sized to this machine. Re-submitting
with the same --name resumes: finished stages are skipped, a half-done one continues from
its last checkpoint. With `ray job submit`, give absolute --data-dir and --out paths on
storage every node can reach (the working dir is a temporary copy).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from kdp.cli import add_run_args, build_config, run_errors  # noqa: E402
from kdp.config import Runtime, ScaleConfig  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_run_args(p)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-workers", type=int, default=1, help="data-parallel workers per stage (default: 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker and per evaluation task")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per worker with --use-gpu (default: 1)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts per stage (default: 3)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept per stage (default: 2)")
    p.add_argument("--eval-shard-size", type=int, default=512, help="test images per eval task (default: 512)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        cfg = build_config(args.preset, args.data_dir, args.name, args.set)
        scale = ScaleConfig(args.num_workers, args.use_gpu, args.cpus_per_worker, args.gpus_per_worker,
                            args.max_failures, args.keep_checkpoints, args.eval_shard_size)
    except run_errors() as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    import ray

    from kdp.distributed import run_distributed
    from kdp.results import load_results, table1

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # embedded: sized to this machine; poll workers often (Train's 2 s default dominates small stages)
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        ray.init()
    rt = Runtime(bf16=args.bf16, channels_last=args.channels_last, progress=not args.quiet)
    path = run_distributed(cfg, args.out, scale, rt, args.classifier)
    print(f"results: {path}\n{table1(load_results(path)).round(2).to_string()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
