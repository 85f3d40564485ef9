"""What the cluster is made of: how large it can grow, and whether every node sees the
same storage. Both matter on a cluster that is not this laptop: an autoscaling cluster
starts with no workers (sizing work by what exists now serializes it), and a node that
failed to mount the shared filesystem writes its checkpoints where no one else looks."""
from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kdp.distributed.config import StorageError
from kdp.distributed.ray_private import autoscaler_max_resources, autoscaler_status
from kdp.storage import LocalStorage

MARKER_DIR = ".kdp-storage"


def cluster_capacity() -> dict[str, float] | None:
    """The most resources the cluster can have. An autoscaler's maximum when Ray publishes it
    (autoscaler v2: node types times max_workers, the bound Ray Train checks); None when an
    autoscaler runs that does not publish it (v1, what `ray up` starts): the cluster grows to
    what is queued, so plan as if unbounded. Without an autoscaler, or on a Ray without the
    private queries (kdp.distributed.ray_private): what the cluster has."""
    most = autoscaler_max_resources()
    now = ray.cluster_resources()
    if most:
        return {k: max(float(now.get(k, 0)), float(most.get(k, 0))) for k in {*now, *most}}
    return None if _autoscaling(autoscaler_status()) else {k: float(v) for k, v in now.items()}


def _autoscaling(status: bytes | None) -> bool:
    """Whether the autoscaler status names node types of a config, not the anonymous
    `node_<id>` of the read-only provider that Ray runs for a hand-started or local cluster."""
    report = json.loads(status).get("autoscaler_report") if status else None
    mapping = (report or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def _read_marker(path: str, token: str, store=None) -> str | None:
    """On one node: None if `path` holds `token` (fetched from the bucket first, if any), else why not."""
    try:
        if store is not None and store.remote and not store.pull(Path(path)):
            return "the marker is not in the bucket"
        got = Path(path).read_text()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None if got == token else "it holds another job's marker"


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_storage(root, timeout_s: float = 120.0) -> int:
    """Write a marker under the output root (a directory, or a kdp.storage bucket whose marker
    object every node fetches into its own mirror), read it back with one task on every alive
    node, and raise StorageError naming the first node that cannot (its address and id, and the
    path). Returns the number of nodes checked. Nodes that join later are checked by each stage,
    which refuses to start where its inputs are missing (`see_paths`, or a failed fetch)."""
    store = root if hasattr(root, "push") else LocalStorage(root)
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    marker = store.root / MARKER_DIR / f"{uuid.uuid4().hex}.txt"
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(token)
    os.replace(tmp, marker)
    try:
        store.push(marker)
        nodes = alive_nodes()
        read = ray.remote(_read_marker)
        refs = [read.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token, store) for n in nodes]
        where = f"reach {store.uri}" if store.remote else f"mount the same storage at {store.root}"
        _, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if late:  # one line naming the node, not Ray's GetTimeoutError
            n = nodes[refs.index(late[0])]
            raise StorageError(f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]}) did not answer the storage "
                               f"check within {timeout_s:g} s (starting, overloaded or unreachable: see `ray status`)")
        for n, why in zip(nodes, ray.get(refs)):
            if why is not None:
                raise StorageError(f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]}) cannot read {marker} "
                                   f"({why}): every node must {where}")
        return len(nodes)
    finally:
        marker.unlink(missing_ok=True)
        try:
            store.remove(marker)
        except StorageError as e:  # never raised over the check's own error
            print(f"[storage] could not remove {marker}: {e}")


def see_paths(paths) -> None:
    """In a worker or task: refuse to run on a node that does not see the run's files."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        node = ray.get_runtime_context().get_node_id()
        raise StorageError(f"node {ray.util.get_node_ip_address()} ({node[:12]}) cannot see {missing[0]}: "
                           "every node must mount the same storage")
