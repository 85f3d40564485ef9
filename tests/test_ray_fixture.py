"""conftest.ray_head touches only what it started: a foreign Ray cluster on the same machine
survives a test head's whole life, and the test head leaves no process behind, not even the
job driver and the grandchild that Ray and the job run in sessions of their own."""
from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import _job_server_up, _naming, _port_open, _proc_table, alive, free_ports, head_processes, ray_head, \
    short_temp_dir, start_head, stop_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a property of the test harness: CI runs it (make test-all)

ENV = {"RAY_AUTH_MODE": "disabled", "KDP_TEST_RAY_HEAD": "on"}
ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # what a bare ray.init() on this machine joins
PROBE = """
import subprocess, sys, time
import ray
ray.init()

@ray.remote
def sleeper():
    time.sleep(3600)

ref = sleeper.remote()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", sys.argv[1]], start_new_session=True)
print("started", flush=True)
time.sleep(3600)
"""


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.25)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return not _port_open(port)


def _leader(gcs_port: int) -> int:
    """The `ray start --block` of the head on gcs_port: the session leader naming that port."""
    table = _proc_table()
    leaders = [p for p in _naming(f"--port={gcs_port}\0") if p in table and table[p][3] == p and b"start" in _cmdline(p)]
    assert len(leaders) == 1, leaders
    return leaders[0]


@pytest.fixture
def foreign_head():
    """Somebody else's cluster: a head in its own session, on free GCS and dashboard ports
    (yields its `ray start` process and those two ports). It takes Ray's default client-server
    and dashboard-agent ports (10001, 52365) when they are free, as a user's `ray start --head`
    would; if they are taken (a real cluster is up), other ports, so that one is left alone."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    gcs, dashboard = free_ports(2)
    extra = () if _free(10001) and _free(52365) else (
        f"--ray-client-server-port={gcs + 1}", f"--dashboard-agent-listen-port={dashboard + 1}")
    with short_temp_dir() as temp_dir:
        proc = start_head(gcs, dashboard, env, num_cpus=1, extra=extra, temp_dir=temp_dir)
        try:
            yield proc, gcs, dashboard
        finally:
            stop_head(proc)


def test_ray_head_stops_its_own_processes_and_leaves_a_foreign_cluster_running(foreign_head, tmp_path):
    foreign_head, foreign_gcs, foreign_dashboard = foreign_head
    gcs_port, dashboard_port = free_ports(2)
    from ray.job_submission import JobStatus, JobSubmissionClient

    table = _proc_table()
    foreign_all = head_processes(foreign_head.pid, table)  # one snapshot: a Ray worker may start meanwhile
    foreign_group = {p: t for p, t in foreign_all.items() if table[p][2] == foreign_head.pid}
    assert len(foreign_group) >= 4  # ray start, gcs_server, raylet, dashboard, ...
    address_before = ADDRESS_FILE.read_text() if ADDRESS_FILE.exists() else None
    token = f"kdp-probe-{uuid.uuid4().hex}"
    (tmp_path / "probe.py").write_text(PROBE)

    with ray_head(gcs_port, dashboard_port, ENV) as env:
        assert os.environ["KDP_TEST_RAY_HEAD"] == "on" and env["KDP_TEST_RAY_HEAD"] == "on"
        leader = _leader(gcs_port)
        (temp_dir,) = [a[len(b"--temp-dir="):].decode() for a in _cmdline(leader).split(b"\0")
                       if a.startswith(b"--temp-dir=")]
        assert temp_dir.startswith("/tmp/kdp-ray-") and Path(temp_dir).is_dir()
        # a job next to the foreign head (which may hold Ray's default agent port): a driver in
        # a session of its own, a Ray task worker in a process group of its own, and a grandchild
        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard_port}")
        job = client.submit_job(entrypoint=f"python probe.py {token}",
                                runtime_env={"working_dir": str(tmp_path), "env_vars": dict(ENV)})

        def started():
            assert client.get_job_status(job) not in (JobStatus.FAILED, JobStatus.STOPPED), client.get_job_logs(job)
            return "started" in client.get_job_logs(job)

        _wait(started, 180, "the probe job to start")
        _wait(lambda: any(_cmdline(p).startswith(b"ray::sleeper") for p in head_processes(leader)), 120,
              "the probe's Ray task")
        _wait(lambda: _naming(token), 30, "the probe's grandchild")
        table = _proc_table()
        mine = head_processes(leader, table)  # the same snapshot (the race CI once lost: KeyError)
        assert set(_naming(token)) <= set(mine)
        assert not set(mine) & set(foreign_all)
        assert {table[p][2] for p in mine} - {leader}, "no worker in a process group of its own"
        assert {table[p][3] for p in mine} - {leader}, "no process in a session of its own"
        assert alive(foreign_group) == foreign_group

    assert "KDP_TEST_RAY_HEAD" not in os.environ
    # the test head is gone, all of it
    assert alive(mine) == {}
    assert _naming(token) == [] and _naming(f"{temp_dir}/") == []
    assert not Path(temp_dir).exists(), "the head's temp dir was left behind"
    assert not _port_open(gcs_port) and not _port_open(dashboard_port)
    # the foreign head is not: the same processes, its GCS and its job server answer
    assert alive(foreign_group) == foreign_group
    assert _port_open(foreign_gcs) and _job_server_up(foreign_dashboard)
    assert (ADDRESS_FILE.read_text() if ADDRESS_FILE.exists() else None) == address_before
