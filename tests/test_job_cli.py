"""jobs/pipeline.py's command line: help, and bad input refused before Ray starts."""
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pipeline.py"


def _run(*args):
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_cluster_options():
    out = _run("--help")
    assert out.returncode == 0
    for flag in ("--num-workers", "--use-gpu", "--address", "--max-failures", "--preset", "ray job submit"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, needle", [
    (("--preset", "giant"), "'giant'"),
    (("--data-dir", "/no/such/cifar"), "/no/such/cifar"),
    (("--num-workers", "0"), "num_workers"),
    (("--set", "ae.eps=-1"), "-1"),
])
def test_bad_input_is_one_line_and_starts_no_ray(args, needle):
    out = _run(*args)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("pipeline: error:") and needle in err and len(err.splitlines()) == 1
    assert "Started a local Ray instance" not in out.stdout + out.stderr
