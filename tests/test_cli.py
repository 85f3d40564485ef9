"""The `kdp` command: help, and a one-line error for each kind of bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from kdp import cli


def test_console_script_help():
    exe = Path(sys.executable).parent / "kdp"  # installed next to the interpreter running the tests
    assert exe.exists(), "the kdp console script is not installed"
    out = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--preset" in out and "--data-dir" in out and "smoke" in out


def test_show_prints_the_paper_preset(capsys):
    assert cli.main(["show", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert '"epochs": 100' in out and '"epochs": 40' in out and '"lr": 0.01' in out


@pytest.mark.parametrize("argv, needle", [
    (["run", "--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["run", "--preset", "huge"], "'huge'"),
    (["run", "--set", "eval.attacks=pgd8+deepfool"], "'deepfool'"),
    (["run", "--set", "ae.eps=-0.1"], "-0.1"),
    (["run", "--set", "classifier.arch=vgg16"], "'vgg16'"),
    (["run", "--set", "students.teachers=at+xt"], "'xt'"),
    (["run", "--set", "classifier.epochs=many"], "many"),
    (["run", "--set", "nosuch.key=1"], "'nosuch'"),
    (["run", "--device", "tpu"], "'tpu'"),
    (["results", "/no/such/results.parquet"], "/no/such/results.parquet"),
    (["run", "--set", "eval.adaptive_attacks=pgd100+aa-strong"], "'aa-strong'"),
    (["run", "--seeds", "0,x"], "'0,x'"),
    (["run", "--seeds", "1.5"], "integers"),
    (["run", "--seeds", ""], "at least one"),
    (["run", "--seeds", "0,0"], "distinct"),
    (["run", "--seed-scope", "all"], "--seeds"),
    (["run", "--set", "eval.aa_subset=500"], "eval.aa_subset=500"),  # smoke: 200 test images
    (["run", "--set", "data.n_test=None", "--set", "eval.aa_subset=5000"], "1017 images"),  # found on loading
    (["run", "--set", "eval.aa_subset=0"], "aa_subset"),
    (["analyze", "/no/such/run"], "/no/such/run"),
])
def test_bad_input_gives_one_line_error(argv, needle, capsys, tmp_path, cifar_subset_dir):
    if argv[0] == "run" and "--data-dir" not in argv:
        argv = argv + ["--data-dir", str(cifar_subset_dir)]
    argv = argv + (["--out", str(tmp_path)] if argv[0] == "run" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdp: error:") and needle in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir()), "nothing may be written for bad input"


def test_unknown_preset_lists_valid_ones(capsys):
    assert cli.main(["show", "--preset", "nope"]) == 2
    assert "paper" in capsys.readouterr().err


def test_module_entrypoint_help(monkeypatch):
    """`python -m kdp.cli --help` prints the parser's own help, every subcommand in it."""
    monkeypatch.setenv("COLUMNS", "100")  # the same line width for argparse here and in the subprocess
    out = subprocess.run([sys.executable, "-m", "kdp.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == cli.parser().format_help()
    assert out.stdout.startswith("usage: kdp [-h] {run,show,results,report,analyze,sweep,cache,export} ...\n")


def test_data_dir_is_recorded_as_an_absolute_path(cifar_subset_dir, monkeypatch):
    """Ray workers and resumed runs have another cwd: a relative --data-dir must not leak."""
    monkeypatch.chdir(cifar_subset_dir.parent)
    cfg = cli.build_config("smoke", data_dir=cifar_subset_dir.name)
    assert Path(cfg.data.data_dir).is_absolute() and Path(cfg.data.data_dir) == cifar_subset_dir.resolve()


def test_a_bug_inside_a_stage_keeps_its_traceback(tmp_path, cifar_subset_dir, monkeypatch, capsys):
    """A ValueError from inside a stage is a bug, not bad input: `kdp run` does not turn it into
    a one-line error (it propagates: a traceback and exit code 1 from the console script), and
    the run's event log records the stage's failure with the traceback."""
    from kdp.events import read_events
    from kdp.stages import drivers

    def broken(*args, **kwargs):
        raise ValueError("injected bug in a recipe")

    monkeypatch.setitem(drivers.RECIPES, "classifier", broken)
    argv = ["run", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", str(tmp_path), "--quiet"]
    with pytest.raises(ValueError, match="injected bug in a recipe"):
        cli.main(argv)
    assert "kdp: error" not in capsys.readouterr().err
    failed = [e for e in read_events(tmp_path / "tiny") if e["status"] == "failed"]
    assert [e["stage"] for e in failed] == ["classifier"]
    assert "injected bug in a recipe" in failed[0]["traceback"] and "in broken" in failed[0]["traceback"]


def test_a_bug_exits_1_with_its_traceback_on_the_console(tmp_path, cifar_subset_dir):
    """The same injected bug in a fresh interpreter, as the console script runs main():
    exit code 1, the traceback on stderr, no one-line "error:"."""
    code = ("import sys; from kdp import cli; from kdp.stages import drivers\n"
            "def broken(*a, **k): raise ValueError('injected bug in a recipe')\n"
            "drivers.RECIPES['classifier'] = broken\n"
            f"sys.exit(cli.main(['run', '--preset', 'tiny', '--data-dir', {str(cifar_subset_dir)!r}, "
            f"'--out', {str(tmp_path)!r}, '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr
    assert "ValueError: injected bug in a recipe" in proc.stderr and "kdp: error" not in proc.stderr
