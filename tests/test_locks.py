"""kdp.locks: one holder at a time, a waiter names the holder, and gives up after its timeout."""
import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest

from kdp.locks import LockTimeout, held, holder


def test_a_waiter_times_out_naming_the_holder(tmp_path):
    lock = tmp_path / "artifact.lock"
    seen = []
    with held(lock, "trial t0 making teacher_at"):
        with pytest.raises(LockTimeout) as e, held(lock, "trial t1", timeout_s=0.3, on_wait=seen.append):
            pass
    msg = str(e.value)
    assert f"host {socket.gethostname()} pid {os.getpid()} (trial t0 making teacher_at)" in msg and str(lock) in msg
    assert len(seen) == 1 and "trial t0" in seen[0]


def test_the_lock_is_free_again_after_the_block_and_records_the_last_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with held(lock, "first"):
        pass
    with held(lock, "second", timeout_s=0.1):
        assert json.loads(lock.read_text())["who"] == "second"
    assert "second" in holder(lock)


def _count_inside(lock: str, inside: str, n: int) -> None:
    """Enter the lock n times; inside it, the marker file must not exist (exclusive create)."""
    for _ in range(n):
        with held(Path(lock), f"pid {os.getpid()}"):
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # raises if another is inside
            os.close(fd)
            os.unlink(inside)


def test_processes_take_the_lock_one_at_a_time(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_count_inside, args=(str(tmp_path / "l.lock"), str(tmp_path / "inside"), 200))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]


def test_cifar_download_runs_under_the_lock(tmp_path, monkeypatch):
    import torchvision.datasets

    from kdp import data

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            lock = Path(root) / ".download.lock"
            with pytest.raises(LockTimeout):  # held by the download itself while it runs
                with held(lock, "another worker", timeout_s=0.05):
                    pass
            calls.append(root)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    assert data.download_cifar(tmp_path) == tmp_path / data.BATCH_DIR
    assert calls == [str(tmp_path)]
