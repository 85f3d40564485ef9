"""kdp.events: a file per writer, merged by time; the tail returns only new whole lines."""
import multiprocessing as mp
import os
import socket

from kdp.events import EventTail, events_file, log_event, read_events


def _write(run_dir: str, who: int, n: int) -> None:
    for i in range(n):
        log_event(run_dir, f"s{who}", "epoch_end", epoch=i, metrics={"loss": 0.5, "pad": "x" * 500})


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(str(tmp_path), k, 300)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    events = read_events(tmp_path)
    assert len(events) == 4 * 300
    assert len(list((tmp_path / "events").glob("*.jsonl"))) == 4  # one file per writing process
    for k in range(4):
        assert [e["epoch"] for e in events if e["stage"] == f"s{k}"] == list(range(300))  # each writer's order
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)


def test_an_event_names_its_writer(tmp_path):
    log_event(tmp_path, "classifier", "started", path="x")
    (e,) = read_events(tmp_path)
    assert (e["stage"], e["status"], e["path"], e["host"], e["pid"]) == (
        "classifier", "started", "x", socket.gethostname(), os.getpid())
    assert events_file(tmp_path).name == f"{socket.gethostname()}-{os.getpid()}.jsonl"


def test_the_tail_returns_new_whole_lines_once(tmp_path):
    tail = EventTail(tmp_path)
    assert tail.new() == []
    log_event(tmp_path, "a", "started")
    other = tmp_path / "events" / "otherhost-1.jsonl"
    other.write_text('{"stage": "b", "status": "started", "time": 0}\n{"stage": "b", "sta')  # a line half-written
    assert [e["stage"] for e in tail.new()] == ["b", "a"]
    assert tail.new() == []
    with open(other, "a") as f:
        f.write('tus": "finished", "time": 1}\n')
    assert [(e["stage"], e["status"]) for e in tail.new()] == [("b", "finished")]
