"""Ray job: the whole kdp pipeline on a Ray cluster (or a fresh local Ray).

    python jobs/pipeline.py --preset smoke --data-dir ../shared/data/cifar10-subset --out runs
    ray job submit --working-dir . -- python jobs/pipeline.py --preset paper --use-gpu \\
        --data-dir /shared/data/cifar10 --out /shared/kdp-runs

Without --address or RAY_ADDRESS it starts its own local Ray sized to this machine (never a
cluster an old /tmp/ray address file names). Re-submitting with the same --name resumes:
finished stages are skipped, a half-done one continues from its last checkpoint. With
`ray job submit`, give absolute --data-dir and --out paths on storage every node can reach
(the working dir is a temporary copy), or a bucket, `--out s3://bucket/prefix`
(docs/object-storage.md). The console shows one line per stage start and
finish and per epoch; each stage's own output is in <out>/<run>/logs/<stage>.log.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from kdp.checkpoint import read_meta  # noqa: E402
from kdp.commands import add_run_args, run_command, run_seeds, runtime  # noqa: E402
from kdp.distributed.config import add_scale_args, connect, isolate, scale_config  # noqa: E402
from kdp.distributed.netns import network_uses, this_command  # noqa: E402
from kdp.interrupt import exit_with  # noqa: E402
from kdp.pipeline import run  # noqa: E402
from kdp.presets import build_config  # noqa: E402
from kdp.results import print_tables  # noqa: E402
from kdp.storage import open_storage  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_run_args(p)
    add_scale_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.rerun = this_command(argv)
    return run_command("pipeline", run_on_ray, args)


def run_on_ray(args) -> None:
    """Bad input fails in one line before Ray starts; then the pipeline on Ray (kdp.pipeline.run)."""
    cfg, scale, rt = build_config(args.preset, args.data_dir, args.name, args.set), scale_config(args), runtime(args)
    seeds = run_seeds(args)
    if args.classifier:
        read_meta(Path(args.classifier))
    store = open_storage(args.out)  # a directory every node mounts, or a bucket every node reaches
    store.preflight()  # once: the run takes this store as it is
    isolate(args.address, scale, network_uses(args.out, cfg.data.data_dir, args.classifier), args.rerun)
    connect(args.address, args.verbose)
    from kdp.distributed.executor import RayExecutor  # here: Ray is imported once, after any re-run above
    from kdp.distributed.nodes import check_shared_storage

    check_shared_storage(store)
    print_tables(run(cfg, store, rt, seeds, args.seed_scope, args.classifier, RayExecutor(scale)))


if __name__ == "__main__":
    exit_with(main())
