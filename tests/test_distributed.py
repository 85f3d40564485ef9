"""The Ray layer's stage runner on an embedded local Ray (no head, no job server)."""
import json

import pytest

from kdp.checkpoint import read_meta
from kdp.config import DataConfig, Runtime, ScaleConfig, TeacherConfig
from kdp.stages.purifier import purifier_spec


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "stages.jsonl").read_text().splitlines()]


def test_fit_stage_trains_and_writes_a_core_checkpoint(local_ray, tmp_path, cifar_subset_dir):
    from kdp.distributed.pipeline import fit_stage

    cfg = TeacherConfig(kind="nt", depth=2, width=4, epochs=3)
    run = tmp_path / "run"
    out = fit_stage("teacher_nt", "teacher", cfg, purifier_spec(cfg), {}, ScaleConfig(keep_checkpoints=1),
                    Runtime(progress=False), DataConfig(str(cifar_subset_dir), n_train=128), run,
                    tmp_path / "storage", run / "teacher_nt")
    meta = read_meta(out)
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3]
    assert meta["spec"]["kwargs"] == {"depth": 2, "width": 4, "head": "literal"}
    kept = list((tmp_path / "storage" / "run-teacher_nt").glob("checkpoint_*"))
    # 3 epochs each reported a checkpoint; Ray prunes to num_to_keep lazily (one may linger)
    assert 1 <= len(kept) <= 2, f"keep_checkpoints=1 left {len(kept)} of 3 checkpoints"
    starts = [e["epoch"] for e in _events(run) if e["status"] == "epoch_start"]
    assert starts == [0, 1, 2]


def test_an_unresumable_train_run_is_moved_aside_and_restarted(local_ray, tmp_path, cifar_subset_dir):
    """A run snapshot truncated by a killed driver must not fail the stage forever."""
    from kdp.distributed.pipeline import fit_stage

    cfg = TeacherConfig(kind="nt", depth=2, width=4, epochs=1)
    run, storage = tmp_path / "run", tmp_path / "storage"
    broken = storage / "run-teacher_nt"
    broken.mkdir(parents=True)
    (broken / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": [')
    out = fit_stage("teacher_nt", "teacher", cfg, purifier_spec(cfg), {}, ScaleConfig(max_failures=0),
                    Runtime(progress=False), DataConfig(str(cifar_subset_dir), n_train=64), run, storage,
                    run / "teacher_nt")
    assert [h["epoch"] for h in read_meta(out)["metrics"]["history"]] == [1]
    failed = [e for e in _events(run) if e["status"] == "resume_failed"]
    assert len(failed) == 1 and list(storage.glob("run-teacher_nt.broken-*"))
