"""Shared fixtures: the real CIFAR-10 subset (read-only, outside the repo) and a tiny slice of it."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from kdp.data import load_cifar

# 2 cores in CI. KDP_TEST_THREADS lets a developer use 1 thread when the machine is busy
# (two OpenMP pools oversubscribing 2 cores slow torch down by an order of magnitude).
torch.set_num_threads(int(os.environ.get("KDP_TEST_THREADS", "2")))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_SUBSET = SHARED_DATA / "cifar10-subset"
CIFAR_JPEG_ZIP = SHARED_DATA / "cifar10-jpeg.zip"


@pytest.fixture(scope="session")
def cifar_subset_dir() -> Path:
    """The 5085/1017-image CIFAR-10 subset in the python-pickle layout (never copied here)."""
    if not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {CIFAR_SUBSET}")
    return CIFAR_SUBSET


@pytest.fixture(scope="session")
def cifar_jpeg_zip() -> Path:
    """All 60000 CIFAR-10 images as an ImageFolder zip of JPEGs (lossy; never copied here)."""
    if not CIFAR_JPEG_ZIP.is_file():
        pytest.skip(f"CIFAR-10 JPEG zip not found at {CIFAR_JPEG_ZIP}")
    return CIFAR_JPEG_ZIP


@pytest.fixture(scope="session")
def tiny_data(cifar_subset_dir):
    """The first 256 training and 64 test images of the subset (treat as read-only)."""
    return load_cifar(cifar_subset_dir, n_train=256, n_test=64)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch uses n threads inside the block (then the number it had)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# the tiny run reduced to what an executor or a storage changes: no baselines, one student, the
# classifier threat model, two attacks; its rows are the tiny run's rows of the same variants
REDUCED = ["--set", "baselines=", "--set", "eval.threat_models=classifier", "--set", "students=at+nt",
           "--set", "eval.attacks=pgd8+fgsm"]
REDUCED_ROWS = 4 * 4  # (none, 2 teachers, a student) x (clean, pgd8, fgsm, the worst case over pgd8 and fgsm)


def wide(stage: str) -> list[str]:
    """`--set`s that make `stage`'s purifier smoke-sized (16-wide, 4+4 blocks): epochs of seconds,
    long enough to stop or kill one mid-stage in a tiny-preset job."""
    return ["--set", f"{stage}.depth=4", "--set", f"{stage}.width=16", "--set", f"{stage}.batch_size=128"]


def same_rows(rows, tiny_run: Path) -> bool:
    """Whether every row (variant, attack, threat model) is the tiny run's, image by image; worst-case rows
    (derived from a suite that `REDUCED` cuts) excepted."""
    from kdp.results import load

    cols = ["variant", "attack", "threat_model", "n", "first", "hits"]
    rows = rows[rows["attack"] != "worst-case"]
    both = rows[cols].merge(load(tiny_run / "results.parquet")[cols], on=cols[:3], suffixes=("", "_local"))
    return len(both) == len(rows) and all((both[c] == both[f"{c}_local"]).all() for c in cols[3:])


def tiny_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """`kdp run` of the tiny preset (argv after `kdp`)."""
    return ["run", "--preset", "tiny", "--data-dir", str(data_dir), "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar_subset_dir) -> Path:
    """The run directory of one finished `kdp run --preset tiny` in this process: every stage,
    baseline, threat model and attack. Shared by every test that reads a finished run, so
    treat it as read-only (copy its output root to change it). One thread, as a 1-CPU Ray
    worker, so that a Ray run of the same config gives the same rows."""
    from kdp import cli

    out = tmp_path_factory.mktemp("tiny")
    with torch_threads(1):
        assert cli.main(tiny_argv(cifar_subset_dir, out)) == 0
    return out / "tiny"


# ---- Ray heads started by tests ------------------------------------------------------------
#
# What `ray start --head --block` leaves on Linux (observed with Ray 2.60): started in a new
# session (start_new_session=True), the `ray start` process is the session and process-group
# leader; gcs_server, raylet, the dashboard (and its module processes), the log monitor, the
# autoscaler monitor, the client server and the raylet's agents share that process group. The
# raylet puts every worker (ray::JobSupervisor, ray::IDLE, tasks, actors) in a process group
# of its own, still in the head's session. A job's driver (`sh -c <entrypoint>`) and the
# watcher that kills it when its supervisor dies each run in a new session of their own
# (start_new_session in ray/dashboard/modules/job/job_supervisor.py), found only through
# their parent, the JobSupervisor worker. So a head's processes are: its session, plus every
# descendant of a member. A foreign cluster is in neither, and is never signalled.


def _proc_table() -> dict[int, tuple[str, int, int, int, int]]:
    """pid -> (state, ppid, pgid, sid, starttime) for every process, from /proc/<pid>/stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        f = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session, ...
        table[int(entry)] = (f[0], int(f[1]), int(f[2]), int(f[3]), int(f[19]))
    return table


def head_processes(leader: int, table: dict | None = None) -> dict[int, int]:
    """The live processes of the head whose `ray start --block` is `leader` (a session leader
    started by us): {pid: starttime} of the members of its session and all their descendants,
    in the process-table snapshot `table` (default: a new one). A caller that reads more of the
    table passes the same snapshot: a process may start or exit between two."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, _, _, sid, _) in table.items() if sid == leader}
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return {pid: table[pid][4] for pid in found if table[pid][0] not in "ZX"}


def alive(procs: dict[int, int]) -> dict[int, int]:
    """The processes of `procs` ({pid: starttime}) still running (same pid and start time)."""
    table = _proc_table()
    return {pid: t for pid, t in procs.items() if pid in table and table[pid][4] == t and table[pid][0] not in "ZX"}


def _signal_all(procs: dict[int, int], sig: int, done: set) -> None:
    """Send `sig` once to each process of `procs` still running and not in `done` (pid, start)."""
    for pid, t in alive(procs).items():  # the start-time check: never signal a recycled pid
        if (pid, t) not in done:
            done.add((pid, t))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


@contextlib.contextmanager
def short_temp_dir(prefix: str = "kdp-ray-"):
    """A fresh directory under /tmp (not $TMPDIR, not tmp_path: Ray's unix socket paths under a
    temp dir must stay within ~107 characters), removed with everything in it on exit. As a
    head's --temp-dir it also keeps /tmp/ray/ray_current_cluster (ray.init()'s default) alone."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that are free now, each with its next port up free too (a test head
    also takes gcs_port + 1 and dashboard_port + 1), picked by the kernel (bind to port 0), so
    two checkouts can run their Ray tests side by side. Bound on all addresses: a port some
    process holds on any address (a worker node on 127.0.0.2, a GCS on 0.0.0.0) is not picked.
    Every socket stays bound until all ports are picked (no port, or neighbour, twice), then
    all are closed: the ports are free, not reserved."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            if len(held) > 200 * n:
                raise RuntimeError(f"found only {len(ports)} of {n} free ports with a free next port")
            s = socket.socket()
            held.append(s)
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
            if port >= 65535:
                continue
            up = socket.socket()
            try:
                up.bind(("0.0.0.0", port + 1))
            except OSError:  # the neighbour is taken: keep `port` bound (not picked again), try another
                up.close()
                continue
            held.append(up)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def start_head(gcs_port: int, dashboard_port: int, env: dict, num_cpus: int = 2, extra: tuple = (),
               timeout: float = 180, *, temp_dir: Path) -> subprocess.Popen:
    """`ray start --head --block` on 127.0.0.1 in a session of its own, with `temp_dir` (short:
    see short_temp_dir; the caller removes it after stop_head) as its --temp-dir; returns once
    the GCS port accepts connections and the job server answers. Its `ray start` output is in
    <temp_dir>/ray-start.log. On failure the processes it started are stopped."""
    bin_dir = Path(sys.executable).parent
    if _port_open(gcs_port) or _port_open(dashboard_port):
        raise RuntimeError(f"port {gcs_port} or {dashboard_port} on 127.0.0.1 is already in use (a Ray head left "
                           f"by an earlier run? processes naming it: {_naming(str(gcs_port))}); stop it first")
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(temp_dir) / "ray-start.log"
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}",
           "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (_port_open(gcs_port) and _job_server_up(dashboard_port)):
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray head on port {gcs_port} not up after {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.25)
    except BaseException:
        stop_head(proc)
        raise
    return proc


def stop_head(proc: subprocess.Popen, grace: float = 20, timeout: float = 30) -> None:
    """Stop everything the head `proc` (from start_head) started, and nothing else: SIGTERM to
    its process group and to every process of its session and their descendants, then SIGKILL
    after `grace` seconds for what is left. The set is collected before signalling and again
    on every poll, so processes that leave the session, or lose their parent, are still found."""
    leader = proc.pid  # not reaped until the end (unless start_head saw it exit), so the pid stays ours
    reaped = proc.returncode is not None
    procs = head_processes(leader)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        if not reaped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(leader, sig)
        done: set = set()
        procs.update(head_processes(leader))
        _signal_all(procs, sig, done)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            procs.update(head_processes(leader))
            if not alive(procs):
                break
            _signal_all(procs, sig, done)  # late starters
            time.sleep(0.1)
        if not alive(procs):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    left = alive(procs)
    if left:
        raise RuntimeError(f"Ray head processes still alive after SIGKILL: {sorted(left)}")


# ---- helpers of the tests that run jobs (test_jobs, test_cluster) -----------------------------

def latest_checkpoint_epoch(train_run: Path) -> int:
    """The epoch of the last checkpoint Ray Train's controller has recorded for a run (0: none)."""
    try:
        snap = json.loads((train_run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return ((snap.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0)


def state_epoch(state_file: Path) -> int:
    """Epochs done in a stage's per-epoch state file (a one-worker stage on Ray is a task that
    saves one, written by rename; 0: none yet)."""
    from kdp.checkpoint import load_state

    state = load_state(state_file)
    return len(state["history"]) if state else 0


def wait_until(pred, timeout: float = 120, what: str = "condition not met", interval: float = 0.05) -> None:
    """Poll pred() every `interval` s until it is true; TimeoutError(what) after `timeout` s
    (monotonic clock)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(interval)


def new_events(before: list[dict], after: list[dict], new_writers: bool = False) -> list[dict]:
    """The events of `after` (a later read_events of the same log) that `before` did not hold, in
    the log's order: what was written between the two reads, found by the log's content, not
    by any clock. With new_writers, only those of processes (host, pid) that wrote none of
    `before`: a late line from a process of an earlier run is not taken for the new run's."""
    from collections import Counter

    def key(e):
        return json.dumps(e, sort_keys=True)

    seen = Counter(key(e) for e in before)
    old = {(e.get("host"), e.get("pid")) for e in before}
    out = []
    for e in after:
        if seen[key(e)]:
            seen[key(e)] -= 1
        elif not (new_writers and (e.get("host"), e.get("pid")) in old):
            out.append(e)
    return out


def driver_stages() -> set[str]:
    """The stages that run in the driver and hold no CPU: the untrained baselines' checkpoints
    and the evaluation's fan-out."""
    from kdp.baselines import BASELINES

    return {"evaluate", *(f"baseline_{n}" for n, d in BASELINES.items() if d.recipe is None)}


def in_flight(events) -> list[int]:
    """How many CPU-bound stages (all but `driver_stages`) were in flight after each started /
    finished event, in the event log's order."""
    drivers = driver_stages()
    n, counts = 0, []
    for e in events:
        if e["stage"] in drivers or e["status"] not in ("started", "resumed", "finished"):
            continue
        n += 1 if e["status"] != "finished" else -1
        counts.append(n)
    return counts


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _job_server_up(dashboard_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _naming(text: str) -> list[int]:
    """pids whose command line contains `text` (for messages and checks only)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
    return pids


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def ray_head(gcs_port: int, dashboard_port: int, env_vars: dict, num_cpus: int = 2):
    """A real Ray head (`ray start --head --block`, dashboard on) bound to 127.0.0.1; yields the
    env for subprocesses and sets `env_vars` in os.environ meanwhile. Take the ports from
    free_ports(2): it also takes gcs_port + 1 (Ray client server) and dashboard_port + 1
    (dashboard agent HTTP), and random metrics ports, so Ray's defaults (10001, 52365, 44217,
    44227) stay free for a cluster of your own: with 52365 taken, the head could not run jobs
    ("No available agent"). Its temp dir is a fresh short_temp_dir, removed at teardown.
    Teardown signals only the processes this head started (stop_head), by pid and process group."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **env_vars, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "AUTOSCALER_METRIC_PORT": "0",
                "DASHBOARD_METRIC_PORT": "0"}
    with short_temp_dir() as temp_dir:
        proc = start_head(gcs_port, dashboard_port, head_env, num_cpus,
                          (f"--ray-client-server-port={gcs_port + 1}",
                           f"--dashboard-agent-listen-port={dashboard_port + 1}"), temp_dir=temp_dir)
        old = {k: os.environ.get(k) for k in env_vars}
        os.environ.update(env_vars)
        try:
            yield env
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            stop_head(proc)


# ---- a real S3 server (tests/s3_server.py) ---------------------------------------------------

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS's `weed mini` on 127.0.0.1 with free ports, for the whole session."""
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """This test's own bucket on the session's server: its URI (`s3://<bucket>`), with the
    client's endpoint and credentials in the environment (as a user sets them) and this
    test's node-local scratch (`KDP_SCRATCH`) under tmp_path."""
    import uuid

    bucket = f"t{uuid.uuid4().hex[:12]}"
    s3_server.admin().create_dir(bucket)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "scratch"))
    return f"s3://{bucket}"


# ---- a real MLflow tracking server (tests/mlflow_server.py) ----------------------------------

@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a local file store, on 127.0.0.1 and a free port, for the whole session."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow") / "store", free_ports(1)[0])
    try:
        wait_until(server.up, 180, "the MLflow server never answered", interval=0.2)
        yield server
    finally:
        server.stop()
