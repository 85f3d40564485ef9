"""benchmarks/lease.sh, the script a GPU lease runs, here on the CPU: two short leases, the
second resuming from what the first packed, write the rows one unlimited run writes; its Ray
step runs a trimmed Ray; the GPU benchmark's smoke."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REDUCED, REDUCED_ROWS, same_rows, short_temp_dir
from kdp.results import load

REPO = Path(__file__).resolve().parents[1]
SETS = REDUCED  # the tiny run reduced: its rows are the session's tiny run's own (conftest.same_rows)


def lease(tmp: Path, n: int, minutes: float, data: Path) -> tuple[int, Path]:
    out = tmp / f"out{n}"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "KDP_LEASE": str(tmp / "lease"), "KDP_LEASE_RUNS": str(tmp / f"runs{n}"),
           "KDP_LEASE_PRESET": "tiny", "KDP_LEASE_DATA": str(data), "KDP_LEASE_ARGS": " ".join(SETS),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rc = subprocess.run(["bash", "benchmarks/lease.sh", "0", str(minutes)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600).returncode
    return rc, out


@pytest.mark.slow  # two tiny runs, about half a minute on 2 cores
def test_two_short_leases_write_the_rows_of_one_unlimited_run(tiny_run, tmp_path, cifar_subset_dir):
    """The second lease resumes what the first packed and writes the rows of one unlimited run:
    the session's tiny run's, image by image (SETS reduces it as the Ray tests do)."""
    (tmp_path / "lease").mkdir()
    # 3 s of a run of about 15: it stops where this machine's speed puts the limit; wherever
    # that is, the second lease must end where one run ends
    rc, out = lease(tmp_path, 1, 0.05, cifar_subset_dir)
    log = (out / "lease.log").read_text()
    assert rc == 75 and "kdp: stopped (time limit reached before " in log, log
    back = sorted(p.name for p in out.iterdir())
    assert len(back) <= 8 and all((out / f).stat().st_size <= 16 * 2**20 for f in back)
    shutil.copytree(out, tmp_path / "lease" / "carry", ignore=shutil.ignore_patterns("lease.log"))
    rc, out = lease(tmp_path, 2, 10, cifar_subset_dir)
    assert rc == 0, (out / "lease.log").read_text()
    rows = load(tmp_path / "runs2" / "tiny" / "results.parquet")
    assert len(rows) == REDUCED_ROWS and same_rows(rows, tiny_run)
    cols, key = ["variant", "attack", "threat_model", "correct", "linf_max"], ["variant", "attack", "threat_model"]
    own = rows[rows["attack"] != "worst-case"]  # the worst case is over REDUCED's suite, not the tiny run's
    one = load(tiny_run / "results.parquet")[cols].merge(own[cols], on=key, suffixes=("", "_lease"))
    assert len(one) == len(own) and all((one[c] == one[f"{c}_lease"]).all() for c in cols[3:]), one


@pytest.mark.slow
@pytest.mark.long  # every stage's recipe at tiny size, twice, 29-34 s: only a GPU lease needs it (run before one)
def test_the_gpu_benchmark_runs_every_stage_and_projects_the_preset(tmp_path):
    """The training variants here are fp32 (`ref`, at 1x and 2x the batch): bf16 crawls on a CPU
    without bf16 units, and the bf16 + channels_last path is in the attack rows' `fast` variant
    here and in tests/test_accel.py."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--device", "cpu", "--out", str(out),
                        "--variants", "ref,ref-x2", "--per-variant", "0.05"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    rows = {(row["stage"], row["variant"]): row for row in report["rows"]}
    for stage in ("classifier", "teacher_at", "teacher_nt", "student_kd_at_nt", "soap", "nrp"):
        assert rows[(stage, "ref")]["img_s"] > 0 and rows[(stage, "ref")]["flops_per_img"] > 0
        assert rows[(stage, "ref-x2")]["batch"] == 2 * rows[(stage, "ref")]["batch"]
    assert {("attack pgd8", "fast"), ("attack pgd100", "ref")} <= set(rows) and "error" not in r.stdout
    assert report["projection_s"]["total_training"] > 0 and report["peak_bf16_tflops"] is None
    assert "projected paper-preset training seconds" in r.stdout


@pytest.mark.slow
@pytest.mark.long  # Ray copied and trimmed, a Train run, a tiny Ray job, 61-69 s: only a GPU lease needs it
@pytest.mark.ray
def test_the_lease_runs_the_trimmed_ray_a_train_collective_and_the_ray_job(tmp_path, cifar_subset_dir):
    """lease.sh's Ray step (issue 25, step 6) with this machine's Ray trimmed as `lease.py
    prepare --ray` trims the GPU image's: that Ray is the one that runs, a Train run's
    all-reduce (gloo here, NCCL on the GPU) sums, and the Ray job writes its rows."""
    import ray

    spec = importlib.util.spec_from_file_location("lease", REPO / "benchmarks" / "lease.py")
    lease_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lease_py)
    site = tmp_path / "site"
    shutil.copytree(Path(ray.__file__).parent, site / "ray", symlinks=True)
    assert lease_py.trim_ray(site) < 200 and not (site / "ray" / "jars").exists()
    (tmp_path / "lease").mkdir()
    with tarfile.open(tmp_path / "lease" / "ray.tar", "w") as tar:  # prepare's is xz: the same, smaller
        tar.add(site, arcname=".")
    shutil.rmtree(site)

    out = tmp_path / "out"
    out.mkdir()
    with short_temp_dir() as ray_tmp:
        env = {**os.environ, "OUT": str(out), "KDP_LEASE": str(tmp_path / "lease"), "KDP_LEASE_RUNS": str(tmp_path / "runs"),
               "KDP_LEASE_DATA": str(cifar_subset_dir), "KDP_LEASE_RAY_ARGS": "", "RAY_TMPDIR": str(ray_tmp),
               "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(["bash", "benchmarks/lease.sh", "0", "0"], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    log = (out / "ray.log").read_text()
    assert proc.returncode == 0 and "ray_gpu.py exit 0" in log and "jobs/pipeline.py exit 0" in log, log[-4000:]
    report = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
    assert report["backend"] == "gloo" and report["sum"] == 1.0 and report["world"] == 1
    assert not report["ray_file"].startswith(str(Path(ray.__file__).parent)), report  # the trimmed copy ran
    assert len(load(tmp_path / "runs-ray" / "tiny" / "results.parquet")) == REDUCED_ROWS
