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


SWEEP = JOB.parent / "sweep.py"


@pytest.mark.parametrize("args, needle", [
    (("--variants", "kd_at,kd_xx"), "'kd_xx'"),
    (("--beta", "0.5,abc"), "'abc'"),
    (("--eps", "0"), "eps value 0.0"),
    (("--gamma", "uniform:2:1"), "low < high"),
    (("--sweep", "/no/such/sweep.yaml"), "/no/such/sweep.yaml"),
    (("--resume",), "--resume takes --name"),
    (("--resume", "--name", "ghost", "--out", "/no/such/root"), "ghost"),
    (("--resume", "--name", "x", "--beta", "0.3"), "drop --beta"),
    (("--preset", "giant"), "'giant'"),
])
def test_sweep_bad_input_is_one_line_and_starts_no_ray(args, needle):
    out = subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("sweep: error:") and needle in err and len(err.splitlines()) == 1
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_sweep_refuses_an_existing_name_without_resume(tmp_path):
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "sweep.json").write_text("{}")
    out = subprocess.run([sys.executable, str(SWEEP), "--name", "abl", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "pass --resume" in out.stderr and "Started a local Ray" not in out.stdout
