"""Every private Ray name kdp uses, each behind one function with a public fallback.

A user's cluster decides its Ray version, and a private name may vanish or change in any
release. Each function resolves its private name in a `try` that catches only ImportError and
AttributeError (the name is gone) and then does what public Ray does; the call itself stays
outside the `try`, so a real failure keeps its traceback. No other kdp module names
`ray._private`, Train's `_internal` package, the internal KV or the autoscaler's `_private`
(tests/test_ray_private.py checks). Importing this module does not import Ray.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
from importlib import resources

log = logging.getLogger(__name__)

# Ray Train V2's run state file in Ray 2.59-2.60 (the fallback of train_snapshot_name)
SNAPSHOT = "checkpoint_manager_snapshot.json"


def quick_placement_group_cleanup(callbacks: list) -> list:
    """Train's default callbacks with the placement-group cleaner's State API poll timing out
    after 1 s instead of 10 s: Ray waits up to 12 s for that cleaner to stop at the end of every
    run, a large part of each stage's fixed cost on 2 cores. Fallback: the callbacks as they are
    (Ray's own cleaner, the slower stop)."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except (ImportError, AttributeError):
        return callbacks
    if "get_actor_timeout_s" not in inspect.signature(PlacementGroupCleanerCallback).parameters:
        return callbacks  # the knob is gone: keep Ray's cleaner
    return [PlacementGroupCleanerCallback(get_actor_timeout_s=1) if isinstance(c, PlacementGroupCleanerCallback)
            else c for c in callbacks]


def train_snapshot_name() -> str:
    """The file name of a Train run's checkpoint-manager snapshot, which kdp reads to refuse a
    torn one before resuming. Fallback: the name Ray 2.59-2.60 use; where a Ray writes another,
    no such file exists and Train resumes or starts over as it decides."""
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as name
    except (ImportError, AttributeError):
        return SNAPSHOT
    return name


def autoscaler_max_resources() -> dict | None:
    """The most resources the autoscaler's config allows (node types times max_workers, the
    bound Ray Train checks), or None where no autoscaler publishes one. Fallback: None, so the
    caller sizes work by the public `ray.cluster_resources()`."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config
    except (ImportError, AttributeError):
        return None
    return most()


def autoscaler_status() -> bytes | None:
    """The autoscaler's status report (JSON, as `ray status` reads it), or None where none runs.
    Fallback: None, as if no autoscaler ran (public Ray has no such query)."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS as key
        from ray.experimental.internal_kv import _internal_kv_get as get
    except (ImportError, AttributeError):
        return None
    return get(key)


def disable_auto_init() -> bool:
    """Turn off Ray's implicit `ray.init()` on the next Ray call in this process, so that a
    thread still running after `ray.shutdown()` (Tune's) cannot start a new local Ray. True when
    done. Fallback: False, Ray's default (auto-init stays on)."""
    try:
        import ray._private.auto_init_hook as hook
    except ImportError:
        return False
    if not hasattr(hook, "enable_auto_connect"):
        return False  # renamed: setting the old name would do nothing
    hook.enable_auto_connect = False
    return True


def validate_cluster_config(raw: dict) -> None:
    """Ray's offline validation of a cluster launcher file, as `ray up` runs it: defaults filled,
    the JSON schema, then head_node_type and min/max workers. Fallback: the schema shipped with
    the public `ray.autoscaler` package and the head_node_type check, without Ray's defaults;
    skipped with one logged line where that schema is missing too. Raises what Ray raises
    (jsonschema.ValidationError, ValueError)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except (ImportError, AttributeError):
        return _schema_only(raw)
    quiet = logging.getLogger(prepare_config.__module__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # prepare_config logs an INFO line per defaulted field
    try:
        validate_config(prepare_config(copy.deepcopy(raw)))
    finally:
        quiet.setLevel(level)


def _schema_only(raw: dict) -> None:
    import jsonschema

    schema = resources.files("ray.autoscaler") / "ray-schema.json"
    if not schema.is_file():
        log.warning("cluster file not validated against Ray's schema: this Ray ships none")
        return
    jsonschema.validate(raw, json.loads(schema.read_text()))
    if "available_node_types" in raw and raw.get("head_node_type") not in raw["available_node_types"]:
        raise ValueError("`head_node_type` must be one of `available_node_types`.")
