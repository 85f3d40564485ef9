"""kdp.distributed.netns: the local Ray a kdp command starts runs in a network namespace of its
own (no interface but loopback: no port reachable from another machine, and none of the
command's sockets in this machine's namespace), with Ray's token authentication on, as Ray
sets it by default (no RAY_AUTH_MODE): a GCS call without the token is refused."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import short_temp_dir
from kdp.distributed.config import ScaleConfig, isolate
from kdp.distributed.netns import DOWNLOAD, available, network_uses, wanted
from kdp.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# the default path of `kdp sweep` / jobs/*.py before Ray starts, then a look from inside
CHILD = r"""
import json, os, socket, sys
import grpc
from kdp.distributed.config import ScaleConfig, connect, isolate
from kdp.distributed.netns import network_uses, this_command
isolate(None, ScaleConfig(), network_uses(sys.argv[1], sys.argv[2]), this_command(None))
connect(None)
import ray
gcs = ray.get_runtime_context().gcs_address
call = grpc.insecure_channel(gcs).unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
def status(metadata):
    try:
        call(b"", metadata=metadata, timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
print(json.dumps({"interfaces": [n for _, n in socket.if_nameindex()], "gcs": gcs, "pid": os.getpid(),
                  "no_token": status(None), "wrong_token": status([("authorization", "Bearer " + "0" * 32)]),
                  "token": status([("authorization", "Bearer " + token)])}), flush=True)
sys.stdin.readline()  # the test looks from outside, then lets it end
"""


def _tree(root: int) -> set[int]:
    kids = {int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(root)], capture_output=True,
                                           text=True).stdout.split()}
    return {root}.union(*(_tree(k) for k in kids))


def _listening_pids() -> set[int]:
    """The pids owning a listening TCP socket in this process's network namespace."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


@pytest.mark.slow  # a real Ray in its own namespace, 10 s: CI (make test's budget has the install in it)
@pytest.mark.ray
@pytest.mark.skipif(not available(), reason="this system forbids unprivileged network namespaces")
def test_a_local_ray_listens_on_loopback_only_with_token_authentication(tmp_path, cifar_subset_dir):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "KDP_PRIVATE"))}
    with short_temp_dir() as ray_tmp:
        env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "out"), str(cifar_subset_dir)],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            seen = json.loads(line)
            assert seen["pid"] == proc.pid  # re-run in place: Ctrl-C and a job's signals reach the same pid
            assert seen["interfaces"] == ["lo"]
            assert os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
            tree = _tree(proc.pid)
            assert len(tree) > 3 and not tree & _listening_pids()  # Ray's processes: no port out here
            assert (seen["no_token"], seen["wrong_token"], seen["token"]) == ("UNAUTHENTICATED", "UNAUTHENTICATED",
                                                                              "OK")
            proc.stdin.close()
            assert proc.wait(60) == 0, proc.stderr.read()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_which_runs_get_a_private_network(tmp_path, monkeypatch):
    monkeypatch.delenv("KDP_PRIVATE_NETWORK", raising=False)
    local = network_uses(tmp_path / "out", tmp_path / "data")
    assert wanted("host", local, False) is False
    assert wanted("auto", local, False) is available()
    assert wanted("auto", local, True) is False  # a GPU run keeps the host's network (NCCL there is unverified)
    assert wanted("auto", network_uses("s3://b/runs", tmp_path), False) is False
    assert DOWNLOAD in network_uses(tmp_path, None) and wanted("auto", network_uses(tmp_path, None), False) is False
    with pytest.raises(ConfigError, match=r"^--network private: s3://b/data needs the network; pass --network host$"):
        wanted("private", network_uses(tmp_path, "s3://b/data"), False)
    with pytest.raises(ConfigError, match="ScaleConfig.network must be one of auto, private, host, got 'lan'"):
        ScaleConfig(network="lan")
    isolate("127.0.0.1:6379", ScaleConfig(network="private"), local, ["false"])  # joining a cluster: nothing
    isolate(None, ScaleConfig(network="private"), local, None)  # called from Python: never re-executed


HOST_CHILD = r"""
import json, sys
from kdp.distributed.config import connect
connect(None)  # the host network: what a run with its output in a bucket gets
import ray
print(json.dumps({"pid": __import__("os").getpid(), "metrics": ray.nodes()[0].get("MetricsExportPort")}), flush=True)
sys.stdin.readline()
"""


@pytest.mark.slow  # a real Ray, 10 s: CI
@pytest.mark.ray
def test_a_local_ray_on_the_host_network_runs_no_per_node_metrics_exporter(tmp_path):
    """Ray's per-node Prometheus exporter binds every interface without authentication: kdp's own
    local Ray does not start it (RAY_enable_metrics_collection=0), so no such port is open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KDP_PRIVATE"))}
    with short_temp_dir() as ray_tmp:
        env.update(HOME=str(tmp_path), RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-c", HOST_CHILD], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            seen = json.loads(line)
            out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
            tree = _tree(proc.pid)
            ports = {int(m[0]) for m in re.findall(r":(\d+)\s.*?pid=(\d+)", out) if int(m[1]) in tree}
            assert seen["metrics"] in (None, -1, 0) or seen["metrics"] not in ports, (seen, ports)
            assert ports, out  # the look did see Ray's own listeners
        finally:
            proc.stdin.close()
            proc.wait(60)

