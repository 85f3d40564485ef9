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

from kdp.cli import add_run_args, add_scale_args, build_config, connect, run_errors, scale_config  # noqa: E402
from kdp.config import Runtime  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_run_args(p)
    add_scale_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        cfg = build_config(args.preset, args.data_dir, args.name, args.set)
        scale = scale_config(args)
    except run_errors() as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    connect(args.address or os.environ.get("RAY_ADDRESS"))
    from kdp.distributed import run_distributed
    from kdp.results import load, table1

    rt = Runtime(bf16=args.bf16, channels_last=args.channels_last, progress=not args.quiet)
    path = run_distributed(cfg, args.out, scale, rt, args.classifier)
    print(f"results: {path}\n{table1(load(path)).round(2).to_string()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
