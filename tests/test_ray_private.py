"""kdp.distributed.ray_private: every private Ray name kdp uses, each with a public fallback.
Each function is run as this Ray has it and with its private name gone (the module made
unimportable through sys.modules, or the attribute removed); no Ray is started. The last test
keeps every other kdp module off Ray's private modules."""
import io
import re
import sys
import tokenize
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kdp.distributed import ray_private

REPO = Path(__file__).resolve().parents[1]
PG_CALLBACK = "ray.train.v2._internal.callbacks.placement_group_callback"
PRIVATE = re.compile(r"ray\._private|ray\.train\.v2\._internal|ray\.experimental\.internal_kv"
                     r"|ray\.autoscaler\._private|_internal_kv")


def gone(monkeypatch, *modules):
    """Importing each of `modules` raises ImportError, as on a Ray without it."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_the_placement_group_cleaner_answers_a_stop_quickly():
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    other = object()
    got = ray_private.quick_placement_group_cleanup([other, PlacementGroupCleanerCallback()])
    assert got[0] is other and isinstance(got[1], PlacementGroupCleanerCallback)
    assert got[1]._get_actor_timeout_s == 1


def test_without_the_cleaner_or_its_knob_rays_callbacks_stay(monkeypatch):
    callbacks = [object()]
    gone(monkeypatch, PG_CALLBACK)
    assert ray_private.quick_placement_group_cleanup(callbacks) is callbacks
    renamed = types.ModuleType(PG_CALLBACK)
    renamed.PlacementGroupCleanerCallback = type("PlacementGroupCleanerCallback", (), {})  # no get_actor_timeout_s
    monkeypatch.setitem(sys.modules, PG_CALLBACK, renamed)
    assert ray_private.quick_placement_group_cleanup(callbacks) is callbacks


def test_the_snapshot_name_is_rays_or_the_known_one(monkeypatch):
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert ray_private.train_snapshot_name() == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == ray_private.SNAPSHOT
    gone(monkeypatch, "ray.train.v2._internal.constants")
    assert ray_private.train_snapshot_name() == "checkpoint_manager_snapshot.json"


def test_without_the_autoscaler_queries_capacity_is_what_ray_cluster_resources_says(monkeypatch):
    import ray

    from kdp.distributed.nodes import cluster_capacity

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2, "memory": 1e9})
    gone(monkeypatch, "ray._private.state", "ray._private.ray_constants", "ray.experimental.internal_kv")
    assert ray_private.autoscaler_max_resources() is None and ray_private.autoscaler_status() is None
    assert cluster_capacity() == {"CPU": 2.0, "memory": 1e9}
    monkeypatch.setitem(sys.modules, "ray._private.state", types.ModuleType("ray._private.state"))  # no `state`
    assert ray_private.autoscaler_max_resources() is None


def test_auto_init_is_turned_off_where_ray_has_the_flag(monkeypatch):
    import ray._private.auto_init_hook as hook

    monkeypatch.setattr(hook, "enable_auto_connect", True)
    assert ray_private.disable_auto_init() is True and hook.enable_auto_connect is False
    monkeypatch.delattr(hook, "enable_auto_connect")
    assert ray_private.disable_auto_init() is False and not hasattr(hook, "enable_auto_connect")
    gone(monkeypatch, "ray._private.auto_init_hook")
    assert ray_private.disable_auto_init() is False


@pytest.mark.parametrize("private", [True, False], ids=["ray", "schema-only"])
def test_cluster_file_validation_with_and_without_rays_own(monkeypatch, private):
    from kdp.distributed.cluster_file import check_cluster_config

    if not private:
        gone(monkeypatch, "ray.autoscaler._private.util")
    raw = yaml.safe_load((REPO / "cluster-efs.yaml").read_text())
    assert not [p for p in check_cluster_config(raw) if "Ray's" in p]
    assert check_cluster_config({**raw, "no_such_key": 1})[0] == \
        "(top level): Ray's schema: Additional properties are not allowed ('no_such_key' was unexpected)"
    assert check_cluster_config({**raw, "max_workers": "many"})[0] == \
        "max_workers: Ray's schema: 'many' is not of type 'integer'"
    assert check_cluster_config({**raw, "head_node_type": "nope"})[0] == \
        "(config): Ray's validation: `head_node_type` must be one of `available_node_types`."


def test_without_rays_schema_the_check_is_skipped_with_one_line(monkeypatch, tmp_path):
    gone(monkeypatch, "ray.autoscaler._private.util")
    monkeypatch.setattr(ray_private.resources, "files", lambda package: tmp_path)  # no ray-schema.json there
    said = []  # the module's logger, heard without pytest's logging plugin (CI may run with -p no:logging)
    monkeypatch.setattr(ray_private, "log", SimpleNamespace(warning=lambda msg, *args: said.append(msg % args)))
    assert ray_private.validate_cluster_config({"no_such_key": 1}) is None
    assert said == ["cluster file not validated against Ray's schema: this Ray ships none"]


def _private_names(source: str) -> list[str]:
    """The private Ray names in Python source, comments left out (they may cite Ray's files)."""
    lines = source.splitlines(keepends=True)
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.COMMENT:  # runs to the end of its line
            row, col = t.start
            lines[row - 1] = lines[row - 1][:col] + "\n"
    return PRIVATE.findall("".join(lines))


def test_only_the_adapter_names_rays_private_modules():
    found = {p.relative_to(REPO).as_posix(): _private_names(p.read_text()) for p in (REPO / "kdp").rglob("*.py")}
    assert found.pop("kdp/distributed/ray_private.py")  # the adapter does, so the scan can see them
    assert {k: v for k, v in found.items() if v} == {}
    assert _private_names("import ray._private.state  # ray._private\nx = _internal_kv_get") == \
        ["ray._private", "_internal_kv"]
