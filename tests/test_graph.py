"""kdp.scheduler.run_graph with fake stages and a fake executor (no training, sub-second): what
starts when, what is skipped, what a failure and a Ctrl-C stop. The real stages through the
same scheduler are tested end to end in test_pipeline.py and, on Ray, test_e2e_ray.py."""
from __future__ import annotations

import _thread
import signal
import threading
from pathlib import Path

import pytest

from kdp import scheduler
from kdp.config import Runtime
from kdp.graph import Stage
from kdp.scheduler import Run, run_graph
from kdp.interrupt import STOP
from kdp.pipeline_config import PipelineConfig
from kdp.stages.eval_cache import AES, META


class FakeExecutor:
    """Runs a stage by writing its output marker; `room` stages at once; `fail` names stages
    that raise; `block` names stages that wait until cancel(); `together`, stages that wait
    until all of them run."""

    def __init__(self, room: int = 1, fail=(), block=(), together=()):
        self.name, self.room, self.fail, self.block = "fake", room, set(fail), set(block)
        self.together = set(together)  # these wait for each other: they must run at the same time
        self.barrier = threading.Barrier(max(1, len(self.together)), timeout=10)
        self.started: list[tuple[str, dict]] = []
        self.running, self.most = 0, 0
        self.cancelled = threading.Event()
        self.lock = threading.Lock()

    def has_room(self, stage, running) -> bool:
        return len(running) < self.room

    def partial(self, stage, out, run) -> bool:
        return False

    def call(self, stage, inputs, out, run) -> Path:
        with self.lock:
            self.started.append((stage.name, dict(inputs)))
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if stage.name in self.together:
                self.barrier.wait()
            if stage.name in self.block:
                _thread.interrupt_main()  # Ctrl-C while this stage is in flight
                self.cancelled.wait(10)
            if stage.name in self.fail:
                raise RuntimeError(f"{stage.name} failed")
            out.mkdir(parents=True, exist_ok=True)
            (out / AES).write_text(stage.name)
            (out / META).write_text("{}")
            return out
        finally:
            with self.lock:
                self.running -= 1

    def cancel(self) -> None:
        self.cancelled.set()


def stage(name: str, *needs: str) -> Stage:
    return Stage(name, "task", name, None, needs, output="aes")


def make_run(tmp_path: Path, stages: list[Stage], given: dict | None = None) -> Run:
    run_dir = tmp_path / "run"
    return Run(PipelineConfig(), None, Runtime(device="cpu", progress=False), run_dir,
               lambda s, inputs: run_dir / s.name, graph=stages, given=given or {}, log=lambda msg: None)


DIAMOND = [stage("a"), stage("b", "a"), stage("c", "a"), stage("d", "b", "c")]


def names(ex: FakeExecutor) -> list[str]:
    return [n for n, _ in ex.started]


@pytest.mark.parametrize("room", [1, 2])
def test_a_stage_starts_once_its_inputs_exist_and_the_executor_has_room(tmp_path, room):
    ex = FakeExecutor(room=room, together={"b", "c"} if room == 2 else ())  # with room: b and c at once
    outputs = run_graph(make_run(tmp_path, DIAMOND), ex)
    assert names(ex)[0] == "a" and names(ex)[-1] == "d" and sorted(names(ex)) == ["a", "b", "c", "d"]
    assert ex.most == room
    assert dict(ex.started)["d"] == {"b": outputs["b"], "c": outputs["c"]}
    assert outputs == {s.name: tmp_path / "run" / s.name for s in DIAMOND}


def test_finished_stages_are_skipped_and_given_ones_never_made(tmp_path):
    run_graph(make_run(tmp_path, DIAMOND), FakeExecutor())
    again = FakeExecutor()
    assert run_graph(make_run(tmp_path, DIAMOND), again)["d"] == tmp_path / "run" / "d" and again.started == []
    given = FakeExecutor()
    elsewhere = tmp_path / "elsewhere"
    outputs = run_graph(make_run(tmp_path / "other", DIAMOND, given={"a": elsewhere}), given)
    assert "a" not in names(given) and dict(given.started)["b"] == {"a": elsewhere} and outputs["a"] == elsewhere


def test_after_a_failure_nothing_new_starts_and_the_error_is_raised(tmp_path):
    ex = FakeExecutor(fail={"a"})
    with pytest.raises(RuntimeError, match="^a failed$"):
        run_graph(make_run(tmp_path, [stage("a"), stage("z"), stage("b", "a")]), ex)
    assert names(ex) == ["a"]
    ex = FakeExecutor(room=2, fail={"b"})  # the stage in flight beside it finishes and is kept
    with pytest.raises(RuntimeError, match="^b failed$"):
        run_graph(make_run(tmp_path / "2", DIAMOND), ex)
    assert "d" not in names(ex) and (tmp_path / "2" / "run" / "c" / AES).is_file()


def test_a_stage_waiting_on_an_input_no_stage_makes_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"stages \['b'\] wait on inputs no stage makes"):
        run_graph(make_run(tmp_path, [stage("b", "ghost")]), FakeExecutor())


def test_ctrl_c_cancels_the_stages_in_flight_without_waiting_for_them(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, "STOP_GRACE_S", 5.0)
    ex = FakeExecutor(block={"a"})
    # Python's own Ctrl-C handler, whatever this process started with (a background job ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_graph(make_run(tmp_path, DIAMOND), ex)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ex.cancelled.is_set() and names(ex) == ["a"]  # the executor was told; nothing new started
    assert not STOP.is_set()  # a bare KeyboardInterrupt (no signal handler) stops this run only
