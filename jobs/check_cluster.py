"""Check a Ray cluster launcher file offline before `ray up` (no AWS call, no credentials).

    python jobs/check_cluster.py                 # checks ./cluster.yaml
    python jobs/check_cluster.py cluster-efs.yaml   # the variant with a shared EFS volume

Checks Ray's own schema validation, placeholders left in (any value containing REPLACE, such
as the EFS id and the AMI id of the shipped cluster.yaml), `latest_dlami` (Ray's default AMI,
too old for torch 2.13), shell variables in setup and start commands that are unset on the
node, the EFS region against provider.region, exactly one availability zone, and a mount
whose failure is swallowed, and without a mount (a bucket output: cluster.yaml) an instance
profile on every node type. Prints each problem on its own line and exits 1, else prints
'<file>: ok' and exits 0. The rules: kdp/distributed/cluster_file.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from kdp.distributed.cluster_file import check_cluster_file  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("cluster_file", nargs="?", default="cluster.yaml", help="the file `ray up` gets (default: cluster.yaml)")
    args = p.parse_args(argv)
    problems = check_cluster_file(args.cluster_file)
    for problem in problems:
        print(f"{args.cluster_file}: {problem}")
    if problems:
        return 1
    print(f"{args.cluster_file}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
