"""The Ray executor on an embedded local Ray (no head, no job server): a training stage as a
Ray Train run (--one-worker train) and as a task, an unresumable run moved aside, every
executor writing the same checkpoints, and the scheduler's room check."""

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import short_temp_dir, wait_until
from kdp.checkpoint import load_checkpoint, read_meta
from kdp.config import DataConfig, Runtime, TeacherConfig
from kdp.pipeline_config import PipelineConfig
from kdp.data import load_cifar
from kdp.events import read_events
from kdp.errors import StorageError
from kdp.graph import Stage
from kdp.scheduler import LocalExecutor, Run, run_graph

# marked one by one: the tests on the embedded local Ray (local_ray) are slow and start Ray; the
# scheduler, sizing, snapshot and autoscaler checks (monkeypatch, no Ray started) are in `make test`
CPU = Runtime(device="cpu", progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """An embedded local Ray whose session dir is in a short temp dir of its own (not /tmp/ray),
    removed afterwards."""
    ray = pytest.importorskip("ray")
    with short_temp_dir() as temp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(temp))
        try:
            yield ray
        finally:
            ray.shutdown()


def _events(run_dir):
    return read_events(run_dir)


def _run_one(ex, stage: Stage, root, data_cfg: DataConfig) -> tuple:
    """One stage through run_graph with executor `ex`; returns (its output, the run dir)."""
    run_dir = root / "run"
    run = Run(PipelineConfig(data=data_cfg), load_cifar(data_cfg.data_dir, data_cfg.n_train, data_cfg.n_test), CPU,
              run_dir, lambda s, inputs: run_dir / s.name, graph=[stage], storage=root / "storage",
              log=lambda *_: None)
    return run_graph(run, ex)[stage.name], run_dir


def _nt(epochs):
    return Stage("teacher_nt", "train", "teacher", TeacherConfig(kind="nt", depth=2, width=4, epochs=epochs,
                                                                  batch_size=32), (), "nt_teacher")


@pytest.mark.slow
@pytest.mark.ray
def test_a_training_stage_runs_as_a_train_run_and_writes_a_core_checkpoint(local_ray, tmp_path, cifar_subset_dir):
    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor

    out, run = _run_one(RayExecutor(ScaleConfig(keep_checkpoints=1, one_worker="train")), _nt(3), tmp_path,
                        DataConfig(str(cifar_subset_dir), n_train=128, n_test=16))
    meta = read_meta(out)
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3]
    assert all(h["seconds"] > 0 for h in meta["metrics"]["history"])
    assert meta["spec"]["kwargs"] == {"depth": 2, "width": 4, "head": "literal"}
    kept = list((tmp_path / "storage" / "run-teacher_nt").glob("checkpoint_*"))
    # 3 epochs each reported a checkpoint; Ray prunes to num_to_keep lazily (one may linger)
    assert 1 <= len(kept) <= 2, f"keep_checkpoints=1 left {len(kept)} of 3 checkpoints"
    assert [e["epoch"] for e in _events(run) if e["status"] == "epoch_start"] == [0, 1, 2]
    assert "Reporting training result" in (run / "logs" / "teacher_nt.log").read_text()  # Ray's lines: in the log


@pytest.mark.slow
@pytest.mark.ray
def test_an_unresumable_train_run_is_moved_aside_and_restarted(local_ray, tmp_path, cifar_subset_dir):
    """A run snapshot truncated by a killed driver must not fail the stage forever: it is
    refused before fit(), moved aside, and the stage starts over."""
    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor

    broken = tmp_path / "storage" / "run-teacher_nt"
    broken.mkdir(parents=True)
    (broken / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": [')
    out, run = _run_one(RayExecutor(ScaleConfig(max_failures=0, one_worker="train")), _nt(1), tmp_path,
                        DataConfig(str(cifar_subset_dir), n_train=64, n_test=16))
    assert [h["epoch"] for h in read_meta(out)["metrics"]["history"]] == [1]
    statuses = [e["status"] for e in _events(run) if e["stage"] == "teacher_nt"]
    assert "resumed" in statuses and statuses.count("resume_refused") == 1
    assert list((tmp_path / "storage").glob("run-teacher_nt.broken-*"))


@pytest.mark.slow
@pytest.mark.ray
def test_a_resumed_run_that_fails_raises_its_error_and_is_kept(local_ray, tmp_path, cifar_subset_dir):
    """A valid snapshot is resumed; a failure then (here: the worker cannot see an input) is
    raised with its own message, and the Train run is not moved aside or restarted."""
    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor

    data_cfg = DataConfig(str(cifar_subset_dir), n_train=64, n_test=16)
    out, run_dir = _run_one(RayExecutor(ScaleConfig(max_failures=0, one_worker="train")), _nt(1), tmp_path, data_cfg)
    train_run = tmp_path / "storage" / "run-teacher_nt"
    snapshot = (train_run / "checkpoint_manager_snapshot.json").read_text()
    shutil.rmtree(out)  # the stage is not done, its Train run is resumable
    stage = dataclasses.replace(_nt(1), needs=("classifier",))
    run = Run(PipelineConfig(data=data_cfg), load_cifar(str(cifar_subset_dir), 64, 16), CPU, run_dir,
              lambda s, inputs: run_dir / s.name, graph=[stage], given={"classifier": tmp_path / "nowhere"},
              storage=tmp_path / "storage", log=lambda *_: None)
    with pytest.raises(Exception, match=r"cannot see .*nowhere"):
        run_graph(run, RayExecutor(ScaleConfig(max_failures=0)))
    assert not list((tmp_path / "storage").glob("run-teacher_nt.broken-*"))
    assert train_run.is_dir() and (train_run / "checkpoint_manager_snapshot.json").read_text() == snapshot
    assert "resume_refused" not in {e["status"] for e in _events(run_dir)}


@pytest.mark.slow
@pytest.mark.ray
def test_a_lease_through_ray_is_renewed_while_held_and_lapses_when_its_holder_dies(local_ray, tmp_path):
    """The sweep's lock on object storage (kdp.distributed.locks): a waiter names the holder
    and times out while the holder renews (for 2.5 leases); a holder that stops renewing (it
    died) loses the lock one lease later; a released lock is free at once."""
    from kdp.distributed.locks import LeaseTable, RayLocks
    from kdp.locks import LockTimeout

    table = LeaseTable.remote()
    holder, other = RayLocks(table, lease_s=1.0), RayLocks(table, lease_s=1.0)
    key = tmp_path / "classifier-1.lock"
    with holder.held(key, "trial a making classifier"):
        with pytest.raises(LockTimeout, match=r"still locked after 2.5s by host .* \(trial a making classifier\)"):
            with other.held(key, "trial b", timeout_s=2.5):
                pass
    with other.held(key, "trial b", timeout_s=0):  # released: free at once
        pass
    assert local_ray.get(table.acquire.remote(str(key), "dead", "a dead holder", 1.0)) is None  # never renewed
    seen = []
    with other.held(key, "trial c", timeout_s=10, on_wait=seen.append):
        assert seen and seen[0].startswith("a dead holder since ")


@pytest.mark.ray
def test_the_shared_storage_check_passes_here_and_a_node_that_does_not_answer_is_one_line(local_ray, tmp_path):
    from kdp.distributed.nodes import MARKER_DIR, check_shared_storage

    assert check_shared_storage(tmp_path) == 1
    with pytest.raises(StorageError, match=r"^node \S+ \(\w{12}\) did not answer the storage check within 1e-09 s"):
        check_shared_storage(tmp_path, timeout_s=1e-9)  # no task answers that fast
    assert not list((tmp_path / MARKER_DIR).glob("*"))  # the markers are removed either way


def test_a_holder_whose_lease_was_taken_stops_before_publishing(local_ray, tmp_path):
    """A renewal that finds another holder (this one was cut off for longer than a lease) marks
    the lease lost: the block ends with LeaseLost, so run_stage never publishes; an error
    raised in the block stays the one raised."""
    import ray

    from kdp.distributed.locks import LeaseLost, RayLocks

    @ray.remote(num_cpus=0)
    class TakenTable:  # the first acquire succeeds; every renewal finds trial z holding it
        def __init__(self):
            self.calls = 0

        def acquire(self, key, token, who, lease_s):
            self.calls += 1
            return None if self.calls == 1 else {"token": "z", "who": "trial z", "since": 0.0, "until": 1e12}

        def release(self, key, token):
            pass

        def count(self):
            return self.calls

    for error in (None, RuntimeError("the stage failed")):
        table = TakenTable.remote()
        locks = RayLocks(table, lease_s=0.4)
        with pytest.raises(LeaseLost if error is None else RuntimeError) as e:
            with locks.held(tmp_path / "classifier.lock", "trial a"):
                wait_until(lambda: local_ray.get(table.count.remote()) >= 2, 30, "a renewal")
                if error is not None:
                    raise error
        assert ("lease was lost (now held by trial z" in str(e.value)) == (error is None)


def test_snapshot_problem_names_what_is_wrong(tmp_path):
    from kdp.distributed.executor import snapshot_problem

    run = tmp_path / "run"
    assert snapshot_problem(run) is None  # nothing to resume
    run.mkdir()
    assert snapshot_problem(run) is None  # no report yet: Train starts it afresh
    snap = run / "checkpoint_manager_snapshot.json"
    snap.write_text("{")
    assert "unreadable" in snapshot_problem(run)
    entry = {"checkpoint_dir_name": "checkpoint_1"}
    snap.write_text(json.dumps({"checkpoint_results": [entry], "latest_checkpoint_result": entry}))
    assert "names checkpoint_1, which has no state.pt" in snapshot_problem(run)
    (run / "checkpoint_1").mkdir()
    (run / "checkpoint_1" / "state.pt").write_bytes(b"x")
    assert snapshot_problem(run) is None


def _structure(meta: dict) -> dict:
    """Keys of a checkpoint.json and of its metrics, with the history's per-epoch keys."""
    m = meta["metrics"]
    return {"top": sorted(meta), "metrics": sorted(m), "history": [sorted(h) for h in m.get("history", [])],
            "final": sorted(m["final"]) if isinstance(m.get("final"), dict) else None}


@pytest.mark.slow
@pytest.mark.ray
def test_both_executors_write_the_same_checkpoints(local_ray, tmp_path, cifar_subset_dir):
    """The same small stages in process and as Ray Train runs: every checkpoint.json has the
    same keys and metric structure, and the deterministic NT teacher (1 worker, CPU, same seed)
    the same weights. (As Ray tasks, the default: the Ray job's rows equal the in-process run's,
    hit by hit, tests/test_e2e_ray.py.)"""
    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor
    from kdp.config import ClassifierConfig

    data_cfg = DataConfig(str(cifar_subset_dir), n_train=128, n_test=32)
    clf = Stage("classifier", "train", "classifier", ClassifierConfig(arch="resnet8", width=4, epochs=1,
                                                                      batch_size=64))
    outs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the 1-CPU Ray worker: other thread counts round differently
    try:
        for name, ex in (("local", LocalExecutor()), ("train", RayExecutor(ScaleConfig(one_worker="train")))):
            outs[name] = {s.name: _run_one(ex, s, tmp_path / name, data_cfg)[0] for s in (_nt(2), clf)}
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "train" / "storage" / "run-teacher_nt").is_dir()
    a = load_checkpoint(outs["local"]["teacher_nt"], torch.device("cpu"))[0].state_dict()
    for stage in ("teacher_nt", "classifier"):
        local, other = read_meta(outs["local"][stage]), read_meta(outs["train"][stage])
        assert _structure(local) == _structure(other), stage
        assert local["config"] == other["config"] and local["spec"] == other["spec"]
    b = load_checkpoint(outs["train"]["teacher_nt"], torch.device("cpu"))[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_the_scheduler_starts_only_what_the_cluster_fits(monkeypatch):
    """On 2 CPUs: two 1-CPU stages at once, not three; a 2-worker stage waits for both CPUs;
    a stage that holds nothing (driver work) always starts; with nothing running, anything starts."""
    import ray

    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    ex, one = RayExecutor(ScaleConfig()), _nt(1)
    jpeg = Stage("baseline_jpeg", "driver", "jpeg", None)
    assert ex.has_room(one, []) and ex.has_room(one, [one]) and not ex.has_room(one, [one, one])
    assert ex.has_room(jpeg, [one, one])
    wide = RayExecutor(ScaleConfig(num_workers=2))
    assert wide.has_room(one, []) and not wide.has_room(one, [one])
    serial = Stage("baseline_nrp", "train", "nrp", None, parallel=False)  # DDP-less: one worker
    assert wide.demand(serial) == {"CPU": 1.0}
    gpu = RayExecutor(ScaleConfig(use_gpu=True))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    assert not gpu.has_room(one, [one])  # one GPU: the second GPU stage waits


def test_a_one_worker_stage_is_a_task_unless_it_needs_train(tmp_path):
    """Train runs: data-parallel stages, a stage whose epochs go to callbacks (a sweep trial's
    student), --one-worker train, and a stage that began as a Train run (so it resumes one)."""
    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor

    run = Run(PipelineConfig(), None, CPU, tmp_path / "run", lambda s, i: tmp_path / "run" / s.name,
              storage=tmp_path / "storage")
    one, out, serial = _nt(1), tmp_path / "run" / "teacher_nt", Stage("baseline_nrp", "train", "nrp", None,
                                                                       parallel=False)
    assert not RayExecutor(ScaleConfig()).train_run(one, out, run)
    assert RayExecutor(ScaleConfig(num_workers=2)).train_run(one, out, run)
    assert not RayExecutor(ScaleConfig(num_workers=2)).train_run(serial, tmp_path / "run" / "baseline_nrp", run)
    assert RayExecutor(ScaleConfig(one_worker="train")).train_run(one, out, run)
    assert RayExecutor(ScaleConfig(), callbacks=lambda s: ["tune"]).train_run(one, out, run)
    (tmp_path / "storage" / "run-teacher_nt").mkdir(parents=True)
    assert RayExecutor(ScaleConfig()).train_run(one, out, run)
    with pytest.raises(ValueError, match="one_worker must be one of task, train, got 'trian'"):
        ScaleConfig(one_worker="trian")


def test_sizing_uses_the_cluster_at_its_largest(monkeypatch):
    """Under an autoscaler without a published maximum every stage may queue; a sweep runs as
    many trials as the grid has and the cluster fits at its largest."""
    from kdp.distributed import executor, sweep
    from kdp.distributed.config import ScaleConfig
    from kdp.sweep import SweepConfig

    one = _nt(1)
    monkeypatch.setattr(executor, "cluster_capacity", lambda: None)
    assert executor.RayExecutor(ScaleConfig(use_gpu=True)).has_room(one, [one] * 5)
    grid = SweepConfig(variants=("kd_at", "kd_nt"), beta=(0.25, 0.5))  # 4 trials
    monkeypatch.setattr(sweep, "cluster_capacity", lambda: None)
    assert sweep.concurrency(grid, ScaleConfig()) == 4
    monkeypatch.setattr(sweep, "cluster_capacity", lambda: {"CPU": 0.0, "GPU": 0.0})  # 0-CPU head, no workers
    assert sweep.concurrency(grid, ScaleConfig()) == 1
    monkeypatch.setattr(sweep, "cluster_capacity", lambda: {"CPU": 12.0, "GPU": 3.0})  # the autoscaler's maximum
    assert sweep.concurrency(grid, ScaleConfig(use_gpu=True)) == 3
    assert sweep.concurrency(grid, ScaleConfig()) == 4
    assert sweep.concurrency(SweepConfig(max_concurrent=2), ScaleConfig()) == 2


@pytest.mark.parametrize("status, autoscaling", [
    (None, False),  # no monitor status yet
    ({"load_metrics_report": {}}, False),  # a local Ray
    ({"autoscaler_report": {"node_type_mapping": {"35892c": "node_35892c", "77aa01": "node_77aa01"}}}, False),
    ({"autoscaler_report": {"node_type_mapping": {"ffff00000": "ray.head.default"}}}, True),  # fake provider
    ({"autoscaler_report": {"node_type_mapping": {"a1": "head", "b2": "gpu_worker"}}}, True),  # ray up
])
def test_an_autoscaler_is_told_from_the_read_only_provider(status, autoscaling):
    """Statuses as Ray 2.60's monitor writes them: hand-started clusters get the read-only
    provider, whose node types are `node_<id>`; a launcher config names its own."""
    import json

    from kdp.distributed.nodes import _autoscaling

    assert _autoscaling(None if status is None else json.dumps(status).encode()) is autoscaling


def test_both_executors_satisfy_the_executor_protocol():
    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor
    from kdp.scheduler import Executor

    assert isinstance(LocalExecutor(), Executor) and isinstance(RayExecutor(ScaleConfig()), Executor)


@pytest.mark.slow
@pytest.mark.ray
def test_a_two_worker_train_run_logs_each_epoch_to_mlflow_once_from_rank_0(local_ray, mlflow_server, tmp_path,
                                                                         cifar_subset_dir):
    from kdp.distributed.config import ScaleConfig
    from kdp.distributed.executor import RayExecutor
    from kdp.tracking import mlflow_call

    data_cfg = DataConfig(str(cifar_subset_dir), n_train=128, n_test=16)
    run_dir = tmp_path / "ddp"
    rt = dataclasses.replace(CPU, mlflow=mlflow_server.uri)
    run = Run(PipelineConfig(data=data_cfg), load_cifar(data_cfg.data_dir, data_cfg.n_train, data_cfg.n_test), rt,
              run_dir, lambda s, inputs: run_dir / s.name, graph=[_nt(2)], storage=tmp_path / "storage",
              log=lambda *_: None)
    run_graph(run, RayExecutor(ScaleConfig(num_workers=2)))
    assert {e["rank"] for e in _events(run_dir) if e["status"] == "epoch_end"} == {0, 1}  # both ranks trained
    exp = mlflow_call(rt.mlflow, "experiments/get-by-name", query={"experiment_name": "ddp"})["experiment"]
    (one,) = mlflow_call(rt.mlflow, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert one["info"]["run_name"] == "teacher_nt" and one["info"]["status"] == "FINISHED"
    loss = mlflow_call(rt.mlflow, "metrics/get-history", query={"run_id": one["info"]["run_id"], "metric_key": "loss"})
    assert sorted(m["step"] for m in loss["metrics"]) == [0, 1]  # rank 0's epochs, each once
    params = {p["key"]: p["value"] for p in one["data"]["params"]}
    assert (params["kind"], params["depth"], params["epochs"]) == ("nt", "2", "2")
