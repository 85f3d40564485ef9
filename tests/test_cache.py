"""`kdp cache`: the AE caches under an output root listed with sizes, and pruned by last use
or by what no run uses, on a copy of the session's tiny run."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import tiny_argv
from kdp import cli

REPO = Path(__file__).resolve().parents[1]


def _copy_root(tiny_run, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(tiny_run.parent, root)
    return root


@pytest.mark.slow  # a run of its own to list and prune (kdp cache's logic: fast tests below)
def test_cache_lists_prunes_unused_and_old_entries(tiny_run, tmp_path, capsys):
    root = _copy_root(tiny_run, tmp_path)
    aes, evals = root / "cache" / "aes", root / "cache" / "eval_aes"
    n_eval = sum(p.is_dir() for p in evals.iterdir())
    assert cli.main(["cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{aes}" in out and "training AEs" in out and f"{evals}" in out and "evaluation AEs" in out
    assert f"total: {n_eval + 1} entries" in out
    # every entry is used by the run: --unused removes nothing
    assert cli.main(["cache", str(root), "--unused"]) == 0
    assert "removed 0 entries" in capsys.readouterr().out
    # an entry no run made or uses (another classifier's) goes; the run's stay
    stray = evals / ("0" * 24)
    shutil.copytree(next(p for p in evals.iterdir() if p.is_dir()), stray)
    meta = (stray / "meta.json").read_text().replace('"model_sha256": "', '"model_sha256": "x')
    (stray / "meta.json").write_text(meta)
    assert cli.main(["cache", str(root), "--unused", "--dry-run"]) == 0
    assert f"would remove {stray}" in capsys.readouterr().out and stray.is_dir()
    assert cli.main(["cache", str(root), "--unused"]) == 0
    assert f"removed {stray}" in capsys.readouterr().out and not stray.exists()
    assert sum(p.is_dir() for p in evals.iterdir()) == n_eval
    # without the run, nothing is used
    shutil.rmtree(root / tiny_run.name)
    assert cli.main(["cache", str(root), "--unused"]) == 0
    assert f"removed {n_eval + 1} entries" in capsys.readouterr().out
    assert not any(p.is_dir() for p in evals.iterdir()) and not any(p.is_dir() for p in aes.iterdir())


def test_cache_prunes_by_last_use(tiny_run, tmp_path, capsys):
    root = _copy_root(tiny_run, tmp_path)
    entries = [p for p in (root / "cache" / "eval_aes").iterdir() if p.is_dir()]
    old = time.time() - 3 * 86400
    os.utime(entries[0] / "meta.json", (old, old))  # last used three days ago
    assert cli.main(["cache", str(root), "--older-than", "2"]) == 0
    out = capsys.readouterr().out
    assert f"removed {entries[0]}" in out and "removed 1 entries" in out
    assert not entries[0].exists() and all(p.exists() for p in entries[1:])
    assert cli.main(["cache", str(root), "--older-than", "-1"]) == 2
    assert "--older-than must be >= 0 days, got -1" in capsys.readouterr().err


@pytest.mark.slow  # a tiny run up to its evaluation, stopped while pruning, then ended by SIGTERM
def test_pruning_everything_keeps_the_entry_a_running_run_reads(tiny_run, tmp_path, cifar_subset_dir, capsys):
    """`kdp cache --older-than 0` while a run is past its training-AE stage: the run holds the
    entry's shared lock (kdp.locks.reading) until it ends, so the prune keeps it and says so;
    once the run has ended (by SIGTERM here), the entry goes."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "root"
    shutil.copytree(tiny_run.parent, root)
    (entry,) = [p for p in (root / "cache" / "aes").iterdir() if p.is_dir()]
    run = subprocess.Popen([sys.executable, "-m", "kdp", *tiny_argv(cifar_subset_dir, root, "--rescore")],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        for line in run.stdout:  # the event: the run has resolved its AEs and is evaluating
            if line.startswith("[evaluate] started"):
                break
        run.send_signal(signal.SIGSTOP)
        assert cli.main(["cache", str(root), "--older-than", "0"]) == 0
        out = capsys.readouterr().out
        assert f"kept {entry}: in use" in out and (entry / "x_adv.npy").is_file()
        run.send_signal(signal.SIGTERM)  # pending until it runs again; the rest of its evaluation is not the point
        run.send_signal(signal.SIGCONT)
        rest = run.communicate(timeout=60)[0]
        assert run.returncode == 143, rest
    finally:
        run.send_signal(signal.SIGCONT)
        run.kill()
        run.wait()
    assert cli.main(["cache", str(root), "--older-than", "0"]) == 0  # the run is over: now it goes
    assert not entry.exists() and f"removed {entry}" in capsys.readouterr().out
