"""kdp.tracking: every training stage's per-epoch metrics as TensorBoard event files, read back
with TensorBoard's own wire format (TFRecord framing, the Event protobuf) and its purge rule,
independently of the writer: each step once, none lost, after a resumed attempt too; and in
MLflow runs on a real tracking server, read back through its REST API."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

from kdp.tracking import TENSORBOARD, EpochBoard, MlflowRun, board_dir


def read_board(d: Path) -> dict[str, dict[int, list[float]]]:
    """{tag: {step: [values]}} as TensorBoard loads a run directory: its files in name order, each
    record a length (uint64), its CRC, an Event, a CRC; a SessionLog START at step s (a purge
    marker) drops what earlier files hold from step s on."""
    scalars: dict[str, dict[int, float]] = {}
    for f in sorted(p for p in Path(d).iterdir() if p.name.startswith("events.out.tfevents.")):
        raw, at = f.read_bytes(), 0
        while at < len(raw):
            (n,) = struct.unpack("<Q", raw[at:at + 8])
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + n])
            at += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for steps in scalars.values():
                    for s in [s for s in steps if s >= event.step]:
                        del steps[s]
            for v in event.summary.value:
                scalars.setdefault(v.tag, {}).setdefault(event.step, []).append(v.simple_value)
    return scalars


def test_a_resumed_attempt_shows_each_epoch_once_with_its_last_values(tmp_path):
    first = EpochBoard(tmp_path, "teacher_at", epochs=4)
    for e in range(3):  # killed after its 3rd epoch's event, before its state: epoch 2 is trained again
        first(e, {"loss": 1.0 - e / 10, "epoch": e, "seconds": 2.0, "note": "text"})
        assert set(read_board(board_dir(tmp_path, "teacher_at"))["loss"]) == set(range(e + 1))  # on disk now
    first.close()
    again = EpochBoard(tmp_path, "teacher_at", epochs=4)
    for e in (2, 3):
        again(e, {"loss": 0.5 - e / 100, "seconds": 1.0})
    got = read_board(board_dir(tmp_path, "teacher_at"))
    assert set(got) == {"loss", "seconds"}  # numbers only; the epoch is the step
    want = {"loss": {0: 1.0, 1: 0.9, 2: 0.48, 3: 0.47}, "seconds": {0: 2.0, 1: 2.0, 2: 1.0, 3: 1.0}}
    assert {t: set(v) for t, v in got.items()} == {t: set(v) for t, v in want.items()}
    assert all(len(got[t][s]) == 1 and abs(got[t][s][0] - v) < 1e-6 for t in want for s, v in want[t].items())
    assert len(list(board_dir(tmp_path, "teacher_at").iterdir())) == 2


def test_every_training_stage_of_a_run_has_its_curves(tiny_run):
    from kdp.events import read_events

    ends = [e for e in read_events(tiny_run) if e["status"] == "epoch_end" and e.get("rank", 0) == 0]
    stages = {e["stage"] for e in ends}
    assert {"classifier", "teacher_at", "teacher_nt", "student_kd_at_nt"} <= stages
    assert {p.name for p in (tiny_run / TENSORBOARD).iterdir()} == stages
    for stage in stages:
        got = read_board(board_dir(tiny_run, stage))
        want = {e["epoch"]: e["metrics"]["loss"] for e in ends if e["stage"] == stage}
        assert set(got["loss"]) == set(want) and all(len(got["loss"][k]) == 1 and
            abs(got["loss"][k][0] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in want.items()), stage  # float32



# ---- MLflow, on a real tracking server (tests/mlflow_server.py: its start is the cost) ---------

def _mlflow_runs(uri: str, experiment: str) -> list[dict]:
    from kdp.tracking import mlflow_call

    exp = mlflow_call(uri, "experiments/get-by-name", query={"experiment_name": experiment})["experiment"]
    return mlflow_call(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]


def _history(uri: str, run: dict, key: str) -> list[tuple[int, float]]:
    from kdp.tracking import mlflow_call

    got = mlflow_call(uri, "metrics/get-history", query={"run_id": run["info"]["run_id"], "metric_key": key})
    return sorted((m["step"], m["value"]) for m in got["metrics"])


@pytest.mark.slow  # the server's venv and start, about 15 s; the runs themselves take a second
def test_mlflow_runs_go_on_when_resumed_and_start_over_with_the_earlier_epochs_when_trained_again(mlflow_server,
                                                                                                  tmp_path):
    uri, run_dir = mlflow_server.uri, tmp_path / "resumed"
    first = MlflowRun(uri, run_dir, "teacher_at", 4, {"depth": 2, "kind": "at"})
    for e in range(2):
        first(e, {"loss": 1.0 - e / 10, "epoch": e + 1, "note": "text"})
    MlflowRun(uri, run_dir, "teacher_at", 4)(2, {"loss": 0.8})  # a resumed attempt: after its last epoch
    (only,) = _mlflow_runs(uri, "resumed")
    assert _history(uri, only, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8)]  # each step once, none lost
    assert {p["key"]: p["value"] for p in only["data"]["params"]} == {"depth": "2", "kind": "at"}
    again = MlflowRun(uri, run_dir, "teacher_at", 4)
    for e in (2, 3):  # trained again from epoch 2 (its state was one epoch behind): a new run
        again(e, {"loss": 0.5 - e / 100})
    runs = {r["info"]["status"]: r for r in _mlflow_runs(uri, "resumed")}
    assert set(runs) == {"FINISHED", "KILLED"} and runs["FINISHED"]["info"]["run_id"] == again.run_id
    assert _history(uri, runs["FINISHED"], "loss") == [(0, 1.0), (1, 0.9), (2, 0.48), (3, 0.47)]
    trial = MlflowRun(uri, tmp_path / "sw" / "trials" / "t1", "student_kd_at_nt", 1)
    trial(0, {"proxy_acc": 0.25})
    assert [r["info"]["run_name"] for r in _mlflow_runs(uri, "sw")] == ["t1/student_kd_at_nt"]  # a sweep's trial


def test_a_bad_mlflow_uri_is_one_line_and_an_absent_server_one_more(tmp_path, monkeypatch):
    from kdp.config import Runtime
    from kdp.errors import ConfigError, TrackingError
    from kdp.tracking import mlflow_call

    with pytest.raises(ConfigError, match=r"--mlflow file:/x: expected a tracking server, http\[s\]://HOST\[:PORT\]"):
        Runtime(mlflow="file:/x")
    with pytest.raises(ConfigError, match=r"--mlflow http://u:\*\*\*@h:1: credentials in the URI are refused"):
        Runtime(mlflow="http://u:secret@h:1")
    monkeypatch.setattr("kdp.tracking.TRIES", 1)
    with pytest.raises(TrackingError, match=r"--mlflow http://127.0.0.1:9: no answer from the tracking server"):
        mlflow_call("http://127.0.0.1:9", "experiments/get-by-name", query={"experiment_name": "x"})
