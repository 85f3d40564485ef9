"""Ray job: a Ray Tune sweep over the method's knobs (the paper's ablation, beta, gamma, eps).

    python jobs/sweep.py --preset smoke --data-dir ../shared/data/cifar10-subset --out runs \\
        --name ablation --beta 0.25,0.5 --eps 4/255,8/255
    python jobs/sweep.py --sweep jobs/sweep.yaml --preset reduced --use-gpu --out /shared/kdp
    python jobs/sweep.py --sweep jobs/sweep.yaml --preset reduced --use-gpu --out s3://bucket/kdp
    python jobs/sweep.py --resume --name ablation --out runs      # continue an interrupted sweep

Each trial trains one student (or none, for at_teacher) and evaluates it; the classifier, the
NT teacher, and the AT teacher and training AEs per eps are made once and shared. Results:
one parquet file per trial under <out>/results/sweep_id=<name>/; load them with
kdp.results.load(<out>/results). Without --address or RAY_ADDRESS a local Ray is started.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from kdp.commands import add_sweep_args, run_command, sweep_command  # noqa: E402
from kdp.distributed.config import add_scale_args  # noqa: E402
from kdp.distributed.netns import this_command  # noqa: E402
from kdp.interrupt import exit_with  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_sweep_args(p)
    add_scale_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    # bad input fails before Ray starts; a bad --resume before any trial runs; Ctrl-C stops it
    args = parse(argv)
    args.rerun = this_command(argv)
    return run_command("sweep", sweep_command, args)


if __name__ == "__main__":
    exit_with(main())
