"""The evaluation's progress lines (kdp.stages.progress): throttled to one per 30 s on a fake clock,
what they say, the thread that prints them while nothing reports, and a real evaluation's batches
reaching them through the in-process executor. (On Ray: tests/test_e2e_ray.py, its last line.)"""
from __future__ import annotations

import threading
from dataclasses import replace

from kdp.config import Runtime
from kdp.stages.progress import Progress, duration, shard_work
from kdp.scheduler import LocalExecutor
from kdp.presets import get_preset
from kdp.stages.drivers import eval_shard
from kdp.stages.shards import shards


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def work(item):
    """A made-up shard: (label, units per attack)."""
    return item


SHARDS = [("classifier clean on none,at_teacher", {"classifier clean": 400}),
          ("full pgd8 on at_teacher", {"full pgd8": 100}),
          ("full pgd8 on kd_nt", {"full pgd8": 100})]


def progress(clock, lines, items=SHARDS):
    return Progress(items, work, lines.append, clock=clock)


def test_at_most_one_line_per_30_s_and_what_it_says():
    clock, lines = Clock(), []
    p = progress(clock, lines)
    p.tick("classifier", "clean", "none,at_teacher", 50)  # 2 defenses x 50 images: 100 units; no line yet
    clock.now += 29.9
    p.tick("classifier", "clean", "none,at_teacher", 50)
    assert lines == []
    clock.now += 0.1
    p.tick("classifier", "clean", "none,at_teacher", 50)  # 300 of 600 units in 30 s: 10/s, 30 s left
    assert lines == ["[eval] 50% (0/3 shards, 0/2 attacks), classifier clean on none,at_teacher, "
                     "10.0 images/s, ~30 s left"]
    clock.now += 29.9
    p.done(SHARDS[0])  # a shard ends: no line before its 30 s either
    assert len(lines) == 1
    clock.now += 0.1
    p.poll()  # 400 of 600 in 60 s; nothing in flight here: the next shard's label
    assert lines[-1] == "[eval] 66% (1/3 shards, 1/2 attacks), full pgd8 on at_teacher, 6.7 images/s, ~30 s left"
    p.done(SHARDS[2])
    p.done(SHARDS[1])
    clock.now += 60
    p.finish()
    assert lines[-1] == "[eval] 100% (3/3 shards, 2/2 attacks) in 2 min, 5.0 images/s"
    assert len(lines) == 3


def test_one_shard_one_attack_says_no_counts_and_nothing_before_the_first_batch():
    clock, lines = Clock(), []
    p = progress(clock, lines, SHARDS[1:2])
    clock.now += 45
    p.poll()
    assert lines == ["[eval] 0%, full pgd8 on at_teacher, 0.0 images/s, time left unknown"]
    p.tick("full", "pgd8", "at_teacher", 500)  # more than the shard's share: counted up to it
    clock.now += 30
    p.poll()
    assert lines[-1] == "[eval] 100%, full pgd8 on at_teacher, 1.3 images/s, ~0 s left"


def test_shards_kept_from_a_stopped_run_count_as_done_but_not_in_the_rate():
    clock, lines = Clock(), []
    p = progress(clock, lines)
    p.done(SHARDS[0], ran=False)
    clock.now += 30
    p.tick("full", "pgd8", "at_teacher", 60)  # 60 units in 30 s: 2/s; 140 left
    assert lines == ["[eval] 76% (1/3 shards, 1/2 attacks), full pgd8 on at_teacher, 2.0 images/s, ~1 min left"]


def test_durations_are_as_precise_as_an_estimate():
    assert [duration(s) for s in (0.4, 59.4, 61, 150, 3599, 3600, 3 * 3600 + 20 * 60 + 59)] == [
        "0 s", "59 s", "1 min", "2 min", "60 min", "1 h 0 min", "3 h 20 min"]


def test_the_thread_prints_a_due_line_while_nothing_reports():
    clock, said = Clock(), threading.Event()
    lines = []
    p = Progress(SHARDS, work, lambda line: (lines.append(line), said.set()), clock=clock)
    with p.lines(check_s=0.01):
        clock.now += 30  # a batch that runs past the 30 s: the thread says so
        assert said.wait(10)
    assert lines == ["[eval] 0% (0/3 shards, 0/2 attacks), classifier clean on none,at_teacher, 0.0 images/s, "
                     "time left unknown"]


def test_the_whole_evaluation_is_the_sum_of_its_shards():
    """One in-process shard and Ray's shards share out the same work per attack."""
    cfg = get_preset("tiny").eval
    variants = ["none", "at_teacher", "kd_nt"]
    _, whole = shard_work(cfg, 40, None, None, 0, None, variants, True)
    summed: dict[str, int] = {}
    for t, a, start, stop in shards(cfg, 40, 16, True):
        _, units = shard_work(cfg, 40, t, a, start, stop, variants, True)
        for k, n in units.items():
            summed[k] = summed.get(k, 0) + n
    assert summed == whole
    assert whole["classifier clean"] == 40 * 3 and whole["classifier aa-standard"] == cfg.aa_subset * 3
    assert "transfer pgd8" not in shard_work(cfg, 40, None, None, 0, None, variants, False)[1]


def test_a_real_evaluation_reports_each_batch_through_the_local_executor(tiny_run, tiny_data, capsys):
    """eval_shard given the driver's progress (LocalExecutor passes its tick): each scored batch
    counts; with the clock 30 s on at every look, each batch prints its line. Without it (a Ray
    task), a shard prints its own last line, and with --quiet (rt.progress False) nothing."""
    cfg = replace(get_preset("tiny").eval, batch_size=8)  # two batches a shard
    clock, lines = Clock(), []

    def later():
        clock.now += 30
        return clock.now
    purifiers = {"none": None, "at_teacher": tiny_run / "teacher_at"}
    args = [(cfg, tiny_run / "classifier", purifiers, tiny_data, Runtime(device="cpu", progress=False), None, None,
             None, "classifier", "fgsm", start, start + 16) for start in (0, 16)]
    p = Progress(args, lambda a: shard_work(a[0], len(a[3].test_y), *a[8:12], a[2], False), lines.append,
                 clock=later)
    rows = LocalExecutor().map(eval_shard, args, None, None, p)
    assert [r["n"] for rs in rows for r in rs] == [16] * 4
    p.finish()
    assert len(lines) == 2 * (1 + 2 + 1) + 1  # a line per attack started, batch and shard done, then the last
    assert lines[0].startswith("[eval] 0% (0/2 shards), classifier fgsm on none,at_teacher, ")
    assert lines[1].startswith("[eval] 25% (0/2 shards), classifier fgsm on none,at_teacher, ")
    assert lines[3].startswith("[eval] 50% (1/2 shards), classifier fgsm on none,at_teacher, ")
    assert lines[-1].startswith("[eval] 100% (2/2 shards) in ") and lines[-1].endswith(" images/s")
    eval_shard(*args[0])
    assert capsys.readouterr().out == ""
    eval_shard(*args[0][:4], replace(args[0][4], progress=True), *args[0][5:])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[eval] classifier fgsm ") and out[1].startswith("[eval] 100% in ") and len(out) == 2
