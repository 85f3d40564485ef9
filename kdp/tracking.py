"""Per-epoch metrics as TensorBoard event files, beside the run's own event log:

    <run>/tensorboard/<stage>/events.out.tfevents.*      one TensorBoard run per stage

(a sweep trial's student under the trial's directory). Written by rank 0 only, one scalar per
numeric metric of each finished epoch, the epoch as the step, flushed at each epoch's end so
`tensorboard --logdir <run>/tensorboard` follows a stage as it trains. An attempt that resumes
a stage (or trains it again) starts its file with TensorBoard's purge marker at its first
epoch: TensorBoard drops the steps an earlier attempt wrote from there on, so no step is shown
twice and nothing before it is lost. With a bucket output the files are published as plain
objects at the stage's end (kdp.scheduler, kdp.distributed.loops).
"""
from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from kdp.errors import ConfigError, TrackingError, redact

TENSORBOARD = "tensorboard"


def board_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage's TensorBoard files go."""
    return Path(run_dir) / TENSORBOARD / stage


class EpochBoard:
    """An on_epoch hook's TensorBoard half: the first finished epoch opens the stage's event file
    (its purge marker at that epoch), each finished epoch adds its metrics and is on disk when the
    call returns (written and flushed here: SummaryWriter's queue thread can still hold an epoch
    when a stopped Ray worker is killed), the last closes it."""

    def __init__(self, run_dir: Path, stage: str, epochs: int):
        self.dir, self.epochs, self.writer = board_dir(run_dir, stage), epochs, None

    def __call__(self, epoch: int, metrics: dict) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        if self.writer is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            # a nanosecond suffix: two attempts within one second get two files, in their order
            self.writer = EventsWriter(str(self.dir / "events"), f".{time.time_ns()}")
            self.writer.write_event(Event(step=epoch, wall_time=time.time(),
                                          session_log=SessionLog(status=SessionLog.START)))
        values = [Summary.Value(tag=name, simple_value=float(value)) for name, value in metrics.items()
                  if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)]
        self.writer.write_event(Event(step=epoch, wall_time=time.time(), summary=Summary(value=values)))
        self.writer.flush()
        if epoch + 1 >= self.epochs:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def board_files(run_dir: Path, stage: str) -> list[Path]:
    """A stage's TensorBoard files (what a bucket output publishes)."""
    d = board_dir(run_dir, stage)
    return sorted(p for p in d.glob("events.out.tfevents.*") if p.is_file()) if d.is_dir() else []


# ---- MLflow ---------------------------------------------------------------------------------
#
# Through the tracking server's REST API (/api/2.0/mlflow/...), with the standard library: the
# mlflow package pins what kdp's lock cannot hold (protobuf < 7, a newer requests than
# robustbench's), and a Ray cluster logs to a server anyway (a file store on one node is not
# reachable from the others).

API = "/api/2.0/mlflow/"
KEY_TAG, LAST_TAG = "kdp_key", "kdp_last_epoch"  # which stage a run is; the last epoch it holds
TRIES = 3


def check_mlflow_uri(uri: str) -> str:
    """An http(s) tracking server address, without credentials (MLflow's own environment
    variables carry them: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and _PASSWORD)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--mlflow {uri}: expected a tracking server, http[s]://HOST[:PORT]")
    if parts.username or parts.password:
        raise ConfigError(f"--mlflow {redact(uri)}: credentials in the URI are refused (kdp would record it); "
                          "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    return uri.rstrip("/")


def _auth() -> dict:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def mlflow_call(uri: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict | None:
    """One REST call (POST with `body`, else GET): its JSON, None when the server says it has no
    such resource; retried on a connection failure or a 5xx, then a one-line TrackingError."""
    url = f"{uri}{API}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **_auth()})
    for attempt in range(TRIES):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if e.code == 404 and "RESOURCE_DOES_NOT_EXIST" in text:
                return None
            if e.code < 500 or attempt == TRIES - 1:
                raise TrackingError(f"--mlflow {uri}: {endpoint} answered {e.code}: {text[:200]}") from None
        except (urllib.error.URLError, OSError) as e:
            if attempt == TRIES - 1:
                raise TrackingError(f"--mlflow {uri}: no answer from the tracking server "
                                    f"({getattr(e, 'reason', e)})") from None
        time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def mlflow_names(run_dir: Path, stage: str) -> tuple[str, str]:
    """(experiment, run name) of a stage: the kdp run's name and the stage; a sweep trial's
    stages in the sweep's experiment, as '<trial id>/<stage>'."""
    run_dir = Path(run_dir)
    if run_dir.parent.name == "trials":
        return run_dir.parent.parent.name, f"{run_dir.name}/{stage}"
    return run_dir.name, stage


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


class MlflowRun:
    """An on_epoch hook's MLflow half: one MLflow run per stage, found again by its `kdp_key` tag
    when an attempt resumes the stage (its epochs go on in the same run, none twice). An attempt
    that trains again epochs the run holds (it resumed from an earlier epoch) opens a new run
    holding the old one's epochs before its first, and ends the old one as KILLED. Each
    finished epoch is one log-batch: its numeric metrics at step = epoch (from 0, as in
    TensorBoard), and the run's `kdp_last_epoch` tag (the epochs it holds); the stage's config goes in as params when the run is created."""

    def __init__(self, uri: str, run_dir: Path, stage: str, epochs: int, params: dict | None = None):
        self.uri, self.epochs, self.params = check_mlflow_uri(uri), epochs, params or {}
        self.experiment, self.name = mlflow_names(run_dir, stage)
        self.run_id = None

    def _experiment_id(self) -> str:
        found = mlflow_call(self.uri, "experiments/get-by-name", query={"experiment_name": self.experiment})
        if found is not None:
            return found["experiment"]["experiment_id"]
        try:
            return mlflow_call(self.uri, "experiments/create", {"name": self.experiment})["experiment_id"]
        except TrackingError:  # another stage created it meanwhile
            return mlflow_call(self.uri, "experiments/get-by-name",
                               query={"experiment_name": self.experiment})["experiment"]["experiment_id"]

    def _open(self, epoch: int) -> None:
        exp = self._experiment_id()
        found = mlflow_call(self.uri, "runs/search", {
            "experiment_ids": [exp], "filter": f"tags.{KEY_TAG} = '{self.name}'", "max_results": 1,
            "order_by": ["attributes.start_time DESC"]}) or {}
        old = (found.get("runs") or [None])[0]
        if old is not None and int(_tags(old).get(LAST_TAG, 0)) <= epoch:  # it holds the epochs before this one
            self.run_id = old["info"]["run_id"]
            mlflow_call(self.uri, "runs/update", {"run_id": self.run_id, "status": "RUNNING"})
            return
        params = [{"key": k[:250], "value": str(v)[:6000]} for k, v in sorted(self.params.items())]
        run = mlflow_call(self.uri, "runs/create", {
            "experiment_id": exp, "run_name": self.name, "start_time": int(time.time() * 1000),
            "tags": [{"key": KEY_TAG, "value": self.name}, {"key": "mlflow.runName", "value": self.name}]})
        self.run_id = run["run"]["info"]["run_id"]
        if params:
            mlflow_call(self.uri, "runs/log-batch", {"run_id": self.run_id, "params": params})
        if old is not None:  # trained again from `epoch` on: the old run's earlier epochs, then it ends
            self._copy(old, epoch)

    def _copy(self, old: dict, epoch: int) -> None:
        points = []
        for key in sorted({m["key"] for m in old["data"].get("metrics", [])}):
            history = mlflow_call(self.uri, "metrics/get-history", query={
                "run_id": old["info"]["run_id"], "metric_key": key, "max_results": 25000}) or {}
            points += [m for m in history.get("metrics", []) if m["step"] < epoch]
        for i in range(0, len(points), 1000):  # the server's per-batch limit
            batch = [{k: m[k] for k in ("key", "value", "timestamp", "step")} for m in points[i:i + 1000]]
            mlflow_call(self.uri, "runs/log-batch", {"run_id": self.run_id, "metrics": batch})
        mlflow_call(self.uri, "runs/set-tag", {"run_id": old["info"]["run_id"], "key": KEY_TAG,
                                               "value": f"{self.name} (trained again: {self.run_id})"})
        mlflow_call(self.uri, "runs/update", {"run_id": old["info"]["run_id"], "status": "KILLED"})

    def __call__(self, epoch: int, metrics: dict) -> None:
        if self.run_id is None:
            self._open(epoch)
        now = int(time.time() * 1000)
        values = [{"key": k, "value": float(v), "timestamp": now, "step": epoch} for k, v in metrics.items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        mlflow_call(self.uri, "runs/log-batch", {"run_id": self.run_id, "metrics": values,
                                                 "tags": [{"key": LAST_TAG, "value": str(epoch + 1)}]})
        if epoch + 1 >= self.epochs:
            mlflow_call(self.uri, "runs/update", {"run_id": self.run_id, "status": "FINISHED",
                                                  "end_time": int(time.time() * 1000)})
