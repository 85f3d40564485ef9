"""A multi-node Ray cluster on this one machine, for the `cluster` tests.

The head and every worker node are the real `ray start` processes a cluster runs, each in a
session of its own, so removing a node (SIGKILL to all of its processes, a machine dying)
and tearing down touch only what the test started (`conftest.stop_head`). The head takes
free ports (`conftest.free_ports`); worker nodes listen on their own loopback address
(127.0.0.2, ...) with their own temp dir (sockets) and free agent port, and are started one
after the other (started together, two nodes picked the same free port). Every temp dir, the
autoscaler's config and the hidden output root's stand-in are under one short directory in
/tmp (`conftest.short_temp_dir`: Ray's socket paths), removed when the cluster stops. A node can be started in its own mount namespace (`unshare`), with
the job's output root hidden behind an empty directory: a node whose shared filesystem
is not mounted.

The autoscaling head uses Ray's own fake multi-node provider, configured as
`ray.cluster_utils.AutoscalingCluster` does (its template, fake_multi_node/example.yaml, is
not in the wheel, so the config is written here). It is not started through
AutoscalingCluster.start or shutdown: both stop every Ray process of the machine, not only
their own. Its worker nodes are children of the head's autoscaler: they go down with it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import free_ports, short_temp_dir, start_head, stop_head

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def _env() -> dict:
    return {**os.environ, **ENV, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "AUTOSCALER_METRIC_PORT": "0", "DASHBOARD_METRIC_PORT": "0"}


def _log_tail(temp: Path, name: str, chars: int = 2000) -> str:
    """The end of a Ray log of the node whose --temp-dir is `temp`, for an error message: why a
    node did not start is in its raylet's log or the head's GCS log, not in `ray start`'s."""
    path = temp / "session_latest" / "logs" / name
    text = path.read_text(errors="replace")[-chars:] if path.is_file() else "(none)"
    return f"\n--- {path}:\n{text}"


def _sockets(port: int) -> str:
    """Every TCP socket on `port`, either end, with its process (`ss`), for an error message: a
    worker that cannot reach the GCS shows whether its connections hang, are refused, or
    reach another listener on the GCS port."""
    if shutil.which("ss") is None:
        return ""
    ss = subprocess.run(["ss", "-tanpo", f"( sport = :{port} or dport = :{port} )"], capture_output=True, text=True)
    return f"\n--- sockets on port {port}:\n{ss.stdout[-3000:]}{ss.stderr[-500:]}"


def can_unshare() -> bool:
    """Unprivileged user and mount namespaces are available (for the storage-blind node)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


class SimCluster:
    """A head with 0 CPUs (no work on it, as in cluster.yaml) and 1-CPU worker nodes, on free
    ports, with their temp dirs under `temp` (short: see conftest.short_temp_dir)."""

    def __init__(self, temp: Path):
        self.port, self.dashboard_port = free_ports(2)
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(temp)
        self.env = _env()
        self.head = None
        self.workers: dict[str, subprocess.Popen] = {}  # ip -> its `ray start --block`
        self.hidden: dict[str, Path] = {}  # ip -> the node's own directory over the hidden path

    def start(self, extra: tuple = (), env: dict | None = None) -> "SimCluster":
        self.head = start_head(self.port, self.dashboard_port, {**self.env, **(env or {})}, num_cpus=0,
                               extra=(f"--ray-client-server-port={self.port + 1}",
                                      f"--dashboard-agent-listen-port={self.dashboard_port + 1}", *extra),
                               temp_dir=self.temp / "head")
        return self

    def add_worker(self, cpus: int = 1, gpus: int = 0, hide: Path | None = None, timeout: float = 120) -> str:
        """Start one worker node; returns its IP. With `hide`, the node sees a directory of its
        own (at first empty) at that path, in its own mount namespace: a shared filesystem not
        mounted, or a node-local scratch directory that no other node shares."""
        i = len(self.workers) + 2
        ip = f"127.0.0.{i}"
        temp = self.temp / f"n{i}"
        temp.mkdir()
        (agent_port,) = free_ports(1)
        cmd = [str(BIN / "ray"), "start", f"--address={self.address}", "--block", f"--node-ip-address={ip}",
               f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats", f"--temp-dir={temp}",
               f"--dashboard-agent-listen-port={agent_port}"]
        if hide is not None:
            empty = Path(tempfile.mkdtemp(prefix="empty-", dir=self.temp))
            self.hidden[ip] = empty
            cmd = ["unshare", "-rm", "sh", "-c", f'mount --bind "{empty}" "{hide}" && exec "$@"', "sh", *cmd]
        log = temp / "ray-start.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.workers[ip] = proc
        start = time.monotonic()
        late = ""  # the GCS port's sockets once the node is late (ray start gives up on the GCS at 30 s)
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > start + timeout:
                raise RuntimeError(f"worker node {ip} did not start:\n{log.read_text()[-3000:]}"
                                   f"{_log_tail(temp, 'raylet.out')}{_log_tail(self.temp / 'head', 'gcs_server.out')}"
                                   f"{late}{_sockets(self.port)}")
            if not late and time.monotonic() > start + 20:
                late = _sockets(self.port).replace("--- sockets", "--- 20 s after ray start, sockets", 1)
            time.sleep(0.2)
        return ip

    def kill_worker(self, ip: str) -> None:
        """The node dies: SIGKILL to every process of it at once, no graceful shutdown."""
        stop_head(self.workers.pop(ip), grace=0)

    def stop(self) -> None:
        """Stop every node (the head even when a worker node will not stop), then raise the first error."""
        errors = []
        for ip in list(self.workers):
            try:
                stop_head(self.workers.pop(ip), grace=5)
            except RuntimeError as e:
                errors.append(e)
        if self.head is not None:
            stop_head(self.head)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def sim_cluster(workers: int = 2, gpus: int = 0, hide: Path | None = None, private: Path | None = None):
    """A started SimCluster with `workers` worker nodes; the last one blind to `hide` if given;
    every one with a directory of its own at `private` if given (SimCluster.hidden)."""
    with short_temp_dir("kdp-sim-") as temp:
        c = SimCluster(temp)
        try:
            c.start()
            for k in range(workers):
                c.add_worker(gpus=gpus, hide=private or (hide if k == workers - 1 else None))
            yield c
        finally:
            c.stop()


@contextlib.contextmanager
def autoscaling_cluster(max_workers: int, cpus: int = 1):
    """A head with 0 CPUs and no workers; Ray's autoscaler adds up to `max_workers` 1-CPU nodes."""
    with short_temp_dir("kdp-sim-") as temp:
        c = SimCluster(temp)
        try:
            c.start(extra=(f"--autoscaling-config={_autoscaling_config(c, max_workers, cpus)}",),
                    env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
            yield c
        finally:
            c.stop()


def _autoscaling_config(c: SimCluster, max_workers: int, cpus: int) -> Path:
    """Ray's fake multi-node provider config for `c`, written under its temp dir."""
    gcs_port = c.port
    cfg = {"cluster_name": "kdp-sim", "max_workers": max_workers, "upscaling_speed": 1.0, "idle_timeout_minutes": 10,
           "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                        "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
           "available_node_types": {
               "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
               "cpu_node": {"resources": {"CPU": cpus}, "node_config": {}, "min_workers": 0, "max_workers": max_workers}},
           "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
           **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
                              "rsync_exclude", "rsync_filter")}, "file_mounts_sync_continuously": False}
    path = c.temp / "autoscaling.json"
    path.write_text(json.dumps(cfg))
    return path


def _job(cluster: SimCluster, script: str, args) -> list[str]:
    """jobs/<script> as a driver connected to the cluster (as `ray job submit` runs it on the head)."""
    return [sys.executable, str(REPO / "jobs" / script), "--address", cluster.address, *args]


def run_job(cluster: SimCluster, script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(_job(cluster, script, args), env=cluster.env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def start_job(cluster: SimCluster, script: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(_job(cluster, script, args), env=cluster.env, stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
