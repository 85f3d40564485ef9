"""jobs/pipeline.py's and jobs/sweep.py's command lines: help, and bad input refused before
Ray starts. Each script runs once from the shell (--help); the bad-input cases call its
main(argv) in this process, with Ray's connect replaced by a tripwire."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdp import cli

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pipeline.py"
SWEEP = JOB.parent / "sweep.py"


def _load(script: Path):
    """jobs/<script> as a module (its main(argv)), without running it as __main__."""
    spec = importlib.util.spec_from_file_location(f"kdp_test_job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jobs():
    return {"pipeline": _load(JOB), "sweep": _load(SWEEP)}


@pytest.fixture
def no_ray(jobs, monkeypatch):
    """Connecting to (or starting) Ray fails the test; after it, Ray must not be initialized."""
    import kdp.distributed.config as dist

    def tripwire(*a, **k):
        raise AssertionError("bad input reached Ray's connect")

    monkeypatch.setattr(dist, "connect", tripwire)
    yield
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized(), "a Ray instance was started"


def _main(main, argv, capsys) -> tuple[int, str]:
    """main(argv) in this process: (its exit code, its stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def test_help_lists_the_cluster_options():
    """The script itself runs from the shell."""
    out = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--num-workers", "--use-gpu", "--address", "--max-failures", "--backend", "--preset", "ray job submit"):
        assert flag in out.stdout


def test_sweep_help_from_the_shell():
    out = subprocess.run([sys.executable, str(SWEEP), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--variants", "--beta", "--eps", "--resume", "--max-concurrent", "--address", "--use-gpu"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, needle", [
    (("--preset", "giant"), "'giant'"),
    (("--data-dir", "/no/such/cifar"), "/no/such/cifar"),
    (("--num-workers", "0"), "num_workers"),
    (("--set", "ae.eps=-1"), "-1"),
    (("--backend", "mpi"), "'mpi'"),
    (("--backend", "nccl"), "nccl needs --use-gpu"),
    (("--use-gpu", "--num-workers", "2", "--gpus-per-worker", "0.5"), "NCCL refuses two ranks on one GPU"),
])
def test_bad_input_is_one_line_and_starts_no_ray(args, needle, jobs, no_ray, capsys):
    code, err = _main(jobs["pipeline"].main, args, capsys)
    assert code == 2, err
    err = err.strip()
    assert err.startswith("pipeline: error:") and needle in err and len(err.splitlines()) == 1


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
def test_sweep_bad_input_is_one_line_and_starts_no_ray(args, needle, jobs, no_ray, capsys):
    code, err = _main(jobs["sweep"].main, args, capsys)
    assert code == 2, err
    err = err.strip()
    assert err.startswith("sweep: error:") and needle in err and len(err.splitlines()) == 1


def test_sweep_refuses_an_existing_name_without_resume(tmp_path, jobs, no_ray, capsys):
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "sweep.json").write_text("{}")
    code, err = _main(jobs["sweep"].main, ["--name", "abl", "--out", str(tmp_path)], capsys)
    assert code == 2 and "pass --resume" in err and len(err.strip().splitlines()) == 1, err


BAD_RUN = [(("--preset", "giant"), "'giant'"), (("--data-dir", "/no/such/cifar"), "/no/such/cifar"),
           (("--set", "eval.attacks=pgd8+deepfool"), "'deepfool'"), (("--set", "ae.eps=-1"), "-1"),
           (("--classifier", "/no/such/classifier"), "/no/such/classifier")]


ENTRIES = ("kdp run", "kdp run --executor ray", "jobs/pipeline.py")
# each executor refuses the other's flags
OTHERS = [("kdp run", ("--use-gpu",), "--use-gpu: only with --executor ray"),
          ("kdp run", ("--address", "127.0.0.1:1"), "--address: only with --executor ray"),
          ("kdp run --executor ray", ("--device", "cpu"), "--device: only with --executor local"),
          ("jobs/pipeline.py", ("--time-limit", "60"), "--time-limit: only with --executor local")]


@pytest.mark.parametrize("entry, args, needle", [(e, a, n) for e in ENTRIES for a, n in BAD_RUN] + OTHERS)
def test_bad_input_is_refused_the_same_way_by_both_executors(entry, args, needle, tmp_path, cifar_subset_dir, jobs,
                                                             no_ray, capsys):
    """The in-process and the Ray executor refuse bad input in one line, before any work; and
    each refuses the other's flags."""
    main, prefix = (jobs["pipeline"].main, []) if entry == "jobs/pipeline.py" else (cli.main, entry.split()[1:])
    data = [] if "--data-dir" in args else ["--data-dir", str(cifar_subset_dir)]
    code, err = _main(main, [*prefix, *args, *data, "--out", str(tmp_path)], capsys)
    assert code == 2, err[-2000:]
    err = err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].split(":")[1].strip() == "error", err
    assert not (tmp_path / "smoke").exists(), "nothing may be written for bad input"


@pytest.mark.slow
@pytest.mark.ray
def test_a_stale_ray_address_file_is_ignored_without_address(tmp_path, cifar_subset_dir, request):
    """Without --address or RAY_ADDRESS the job starts its own Ray, even when the address file
    of a crashed cluster (in this test's own RAY_TMPDIR) names a dead GCS."""
    import os
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="kdp-stale-", dir="/tmp"))  # short: Ray's socket paths
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="disabled")
    args = ["--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", str(tmp_path), "--set", "data.n_train=128",
            "--set", "data.n_test=20", "--set", "classifier.epochs=1", "--set", "eval.attacks=fgsm",
            "--set", "eval.threat_models=classifier", "--set", "baselines=", "--set", "students=",
            "--set", "at_teacher.epochs=1", "--set", "nt_teacher.epochs=1", "--set", "eval.batch_size=20", "--quiet"]
    out = subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=420, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "results:" in out.stdout and (tmp_path / "tiny" / "results.parquet").is_file()


def test_gloo_makes_fractional_gpus_with_several_workers_allowed():
    from kdp.distributed.config import ScaleConfig

    s = ScaleConfig(use_gpu=True, num_workers=2, gpus_per_worker=0.5, backend="gloo")
    assert (s.torch_backend, ScaleConfig().torch_backend, ScaleConfig(use_gpu=True).torch_backend) == (
        "gloo", "gloo", "nccl")
