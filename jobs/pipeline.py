"""Ray job: the whole kdp pipeline on a Ray cluster (or a fresh local Ray); `kdp run --executor ray`.

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

from kdp.commands import add_pipeline_args, pipeline_command, run_command  # noqa: E402
from kdp.distributed.netns import this_command  # noqa: E402
from kdp.interrupt import exit_with  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_pipeline_args(p, "ray")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.rerun = this_command(argv)
    return run_command("pipeline", pipeline_command, args)


if __name__ == "__main__":
    exit_with(main())
