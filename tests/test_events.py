"""kdp.events: a file per writer, merged by time; the tail returns only new whole lines."""
import json
import multiprocessing as mp
import os
import socket

from kdp.events import EventTail, events_file, log_event, read_events


def _write(run_dir: str, who: int, n: int) -> None:
    for i in range(n):
        log_event(run_dir, f"s{who}", "epoch_end", epoch=i, metrics={"loss": 0.5, "pad": f"{who}{i:03d}" * 125})


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(str(tmp_path), k, 300)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    events = read_events(tmp_path)
    assert len(events) == 4 * 300
    files = sorted((tmp_path / "events").glob("*.jsonl"))
    assert len(files) == 4  # one file per writing process
    for k in range(4):
        mine = [e for e in events if e["stage"] == f"s{k}"]
        assert [e["epoch"] for e in mine] == list(range(300))  # each writer's order, by the sequence it wrote
        assert len({(e["host"], e["pid"]) for e in mine}) == 1  # one process per writer
        assert all(e["metrics"] == {"loss": 0.5, "pad": f"{k}{e['epoch']:03d}" * 125} for e in mine)  # no torn lines
    for f in files:  # each file: 300 whole lines, all of the writer it is named after
        own = [json.loads(line) for line in f.read_text().splitlines()]
        assert [f"{e['host']}-{e['pid']}" for e in own] == [f.stem] * 300


def test_read_events_merges_the_files_by_time_keeping_each_files_order_on_ties(tmp_path):
    """Events from several writers come back ordered by their time; equal times keep the file
    order (by file name), then each file's own line order."""
    d = tmp_path / "events"
    d.mkdir()
    lines = {"b-2.jsonl": [("b1", 1.0), ("b2", 3.0), ("b3", 3.0)], "a-1.jsonl": [("a1", 2.0), ("a2", 3.0)],
             "c-3.jsonl": [("c1", 0.5), ("c2", 3.0), ("c3", 4.0)]}
    for name, evs in lines.items():
        (d / name).write_text("".join(json.dumps({"stage": s, "status": "x", "time": t}) + "\n" for s, t in evs))
    assert [e["stage"] for e in read_events(tmp_path)] == ["c1", "b1", "a1", "a2", "b2", "b3", "c2", "c3"]


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
