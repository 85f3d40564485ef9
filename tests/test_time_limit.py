"""`--time-limit`: a command stops at the first epoch or evaluation-shard boundary where the next
would not fit (exit 75, one line), and the same command resumes to the rows an unlimited run
writes. Time is a fake clock that the test moves, never a sleep."""
from __future__ import annotations

import shutil
import types

import pytest
import torch

from conftest import tiny_argv, torch_threads
from kdp import cli, interrupt
from kdp.interrupt import OutOfTime, time_limit
from kdp.results import load
from kdp.stages import drivers
from kdp.train import fit


class Clock:
    """time.monotonic / time.perf_counter that move only when told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(interrupt, "time", types.SimpleNamespace(monotonic=c))
    import kdp.train

    monkeypatch.setattr(kdp.train, "time", types.SimpleNamespace(perf_counter=c))
    return c


def _fit(clock: Clock, epochs: int, state, seen: list) -> list[dict]:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch_fn(epoch):
        seen.append(epoch)
        clock.now += 25.0  # every epoch takes 25 s
        return {"loss": float(epoch)}
    return fit(epochs, epoch_fn, model, opt, state_path=state, progress=False)


def test_a_limited_fit_stops_before_an_epoch_that_would_not_fit_and_resumes(clock, tmp_path):
    state, seen = tmp_path / "state.pt", []
    with time_limit(1.0), pytest.raises(OutOfTime, match="before train epoch 3") as e:
        _fit(clock, 4, state, seen)  # epochs end at 25 s and 50 s; a third would end at 75 > 60
    assert seen == [0, 1] and e.value.code == 75
    with time_limit(1.0):  # the next command: the last epoch's 25 s fit twice more
        history = _fit(clock, 4, state, seen)
    assert seen == [0, 1, 2, 3] and [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["seconds"] for h in history] == [25.0] * 4
    with pytest.raises(OutOfTime):  # nothing starts once the time is up
        with time_limit(0.1):
            clock.now += 7
            interrupt.before("stage x")


@pytest.mark.slow  # the tiny run's evaluation again, 7 s: CI
def test_a_limited_evaluation_resumes_at_its_next_shard_with_the_same_rows(tiny_run, tmp_path, monkeypatch,
                                                                             cifar_subset_dir, clock, capsys):
    out = tmp_path / "root"
    shutil.copytree(tiny_run.parent, out)
    real, calls = drivers.eval_shard, []

    def shard_then_time_is_up(*args):
        calls.append((*args[8:10], tuple(args[2])))  # (threat model, attack, defenses)
        rows = real(*args)
        if len(calls) == 3:
            clock.now += 3600.0  # the third shard ran past the limit
        return rows

    monkeypatch.setattr(drivers, "eval_shard", shard_then_time_is_up)
    argv = tiny_argv(cifar_subset_dir, out, "--rescore", "--time-limit", "30")
    with torch_threads(1):
        assert cli.main(argv) == 75
        assert "kdp: stopped (time limit reached before evaluation shard 4/" in capsys.readouterr().err
        kept = sorted((out / "tiny" / "state" / "evaluate").glob("*.json"))
        assert len(kept) == 3 and len(calls) == 3
        assert cli.main(argv) == 0
    assert len(set(calls)) == len(calls)  # no shard ran twice
    assert not list((out / "tiny" / "state" / "evaluate").glob("*.json"))
    cols = ["variant", "attack", "threat_model", "n", "correct", "hits", "linf_max", "check.src_fooled"]
    key = ["variant", "attack", "threat_model"]
    before = load(tiny_run / "results.parquet")[cols].sort_values(key).reset_index(drop=True)
    after = load(out / "tiny" / "results.parquet")[cols].sort_values(key).reset_index(drop=True)
    assert before.equals(after)


def test_the_time_limit_flag_is_refused_when_not_positive(capsys):
    assert cli.main(["run", "--preset", "tiny", "--time-limit", "0"]) == 2
    assert "time_limit must be > 0, got 0" in capsys.readouterr().err
