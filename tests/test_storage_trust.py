"""What a first cluster user would hit in a bucket output, against the real S3 server
(tests/s3_server.py): two writers of one artifact, a mirror that outlives the bucket's copy,
hostile names, credentials in a URI, a store that stalls, and errors that must stay one line."""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from kdp import bucket, cli, commands
from kdp.bucket_io import local_write, why
from kdp.checkpoint import save_state
from kdp.errors import StorageError
from kdp.scheduler import publishing
from kdp.storage import MANIFEST, BucketStorage, publish_quietly, publishing_each


def _dir(d: Path, content: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.pt").write_bytes(content * 100)
    (d / "checkpoint.json").write_text(json.dumps({"made_from": content.decode()}))
    return d


def _put(server, key: str, data: bytes) -> None:
    with server.admin().open_output_stream(key) as out:
        out.write(data)


def test_two_writers_interleaved_publish_whole_versions_and_the_later_commit_wins(s3, tmp_path):
    a, b = BucketStorage(f"{s3}/r", tmp_path / "a"), BucketStorage(f"{s3}/r", tmp_path / "b")
    da, db = _dir(a.root / "classifier", b"A"), _dir(b.root / "classifier", b"B")
    real_put = a._put_bytes

    def b_publishes_before_a_commits(key, data):  # the window of defect 1: A's files up, B whole, then A
        if key.endswith(MANIFEST):
            b.push(db)
        real_put(key, data)

    a._put_bytes = b_publishes_before_a_commits
    a.push(da)
    reader = BucketStorage(f"{s3}/r", tmp_path / "reader")
    assert reader.pull(reader.root / "classifier")  # on today's main: a sha256 error, for good
    got = reader.root / "classifier"
    assert (got / "checkpoint.json").read_text() == (da / "checkpoint.json").read_text()
    assert (got / "model.pt").read_bytes() == (da / "model.pt").read_bytes()  # A's, whole: never mixed
    b.push(db)  # B publishes again: its version is committed whole (on main: "already there", nothing)
    assert reader.pull(got) and (got / "checkpoint.json").read_text() == (db / "checkpoint.json").read_text()
    gone = a.collect(a.root / "classifier", keep=json.loads((got / MANIFEST).read_text())["version"], grace_s=0)
    assert json.loads((da / MANIFEST).read_text())["version"] in gone and len(gone) == 2  # A's, B's first
    assert reader.pull(got)


def test_the_bucket_is_the_truth_over_a_nodes_mirror(s3, s3_server, tmp_path):
    node = BucketStorage(f"{s3}/r", tmp_path / "node")
    ckpt = _dir(node.root / "exp" / "classifier", b"A")
    node.push(ckpt)
    s3_server.admin().delete_dir(f"{s3[5:]}/r/exp/classifier")  # deleted to retrain it
    assert not node.pull(ckpt) and not ckpt.exists()  # gone for the run, not uploaded again
    state = node.root / "exp" / "state.json"
    state.write_text("{}")  # a mirror file the bucket never had (another server's, an old run's)
    assert not node.pull(state) and not state.exists()

    part = node.root / "results" / "sweep_id=s"
    for name in ("t1.parquet", "t2.parquet"):
        _put(s3_server, f"{s3[5:]}/r/results/sweep_id=s/{name}", b"1234")
    node.pull_tree(part)
    assert sorted(p.name for p in part.iterdir() if not p.name.startswith(".")) == ["t1.parquet", "t2.parquet"]
    s3_server.admin().delete_file(f"{s3[5:]}/r/results/sweep_id=s/t2.parquet")
    _put(s3_server, f"{s3[5:]}/r/results/sweep_id=s/t1.parquet", b"5678")  # same size, new object
    node.pull_tree(part)
    assert not (part / "t2.parquet").exists() and (part / "t1.parquet").read_bytes() == b"5678"


@pytest.mark.parametrize("name", ["../../escaped.txt", "/tmp/abs.txt", "sub/../../escaped.txt"])
def test_a_name_from_the_bucket_that_leaves_the_mirror_is_refused(s3, s3_server, tmp_path, name, capsys):
    """Refused in one line, and the artifact taken as not made (its stage makes it again)."""
    node = BucketStorage(f"{s3}/r", tmp_path / "node")
    manifest = {"files": {name: [4, "0" * 64]}, "version": "v1"}
    _put(s3_server, f"{s3[5:]}/r/classifier/{MANIFEST}", json.dumps(manifest).encode())
    assert not node.pull(node.root / "classifier")
    err = capsys.readouterr().err
    assert "refused the name" in err and err.count("\n") == 1 and not (tmp_path / "escaped.txt").exists()
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/abs.txt").exists()


def test_a_corrupt_manifest_is_one_line_and_a_publish_repairs_it(s3, s3_server, tmp_path, capsys):
    node = BucketStorage(f"{s3}/r", tmp_path / "node")
    _put(s3_server, f"{s3[5:]}/r/classifier/{MANIFEST}", b"{not json")
    assert not node.pull(node.root / "classifier")
    assert r"classifier/.kdp-manifest.json: a corrupt commit; taken as not made" in capsys.readouterr().err
    node.push(_dir(node.root / "classifier", b"A"))
    assert BucketStorage(f"{s3}/r", tmp_path / "other").pull(tmp_path / "other" / s3[5:] / "r" / "classifier")


@pytest.mark.parametrize("secret", ["kdpTestSecretValue", "kdpTest/Secret+Value/with:colon"])
def test_credentials_in_a_uri_are_refused_and_never_written(tmp_path, capsys, monkeypatch, cifar_subset_dir, secret):
    """Whatever the secret holds (about half of AWS secret keys hold a `/`): refused in one line
    showing `KEY:***@`, by every entry point that takes a URI, and written nowhere."""
    from kdp.results import load

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDP_SCRATCH", str(tmp_path / "scratch"))
    key = "AKIAKDPTESTKEY"
    runs = [["run", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", f"s3://{key}:{secret}@b/u"],
            ["run", "--preset", "tiny", "--data-dir", f"s3://{key}:{secret}@b/data", "--out", str(tmp_path / "o")],
            ["report", f"s3://{key}:{secret}@b/u/tiny", "--out", str(tmp_path / "report")]]
    for argv in runs:
        assert cli.main(argv) == 2
        out = capsys.readouterr()
        assert f"s3://{key}:***@b/" in out.err and "credentials in a URI are refused" in out.err, out.err
        assert out.err.count("\n") == 1 and secret not in out.err + out.out
    with pytest.raises(StorageError, match="credentials in a URI are refused") as e:
        load(f"s3://{key}:{secret}@b/u/tiny")
    assert secret not in str(e.value)
    for p in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert secret.encode() not in p.read_bytes(), p


def test_no_error_line_carries_a_uris_secret(monkeypatch):
    """Every kdp error's message is redacted, an endpoint's credentials included."""
    from kdp.bucket_io import why
    from kdp.errors import KdpError, redact

    assert redact("at http://user:pa/ss:w@host:9000 and s3://K:S/x+y@b/p; s3://b/a:b/c@d") == \
        "at http://user:***@host:9000 and s3://K:***@b/p; s3://b/a:b/c@d"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:very/secret@127.0.0.1:1")
    line = str(StorageError(f"s3://b/u: {why(OSError('Could not connect to the endpoint'))}"))
    assert line == "s3://b/u: cannot reach the endpoint http://minio:***@127.0.0.1:1"
    assert "secret" not in str(KdpError("s3://K:very/secret@b"))


@pytest.mark.slow  # a store's outage timed out for real, 6-9 s: CI
def test_a_stalled_store_is_ridden_out_and_a_dead_one_fails_in_one_line(s3, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("KDP_STORE_TIMEOUT_S", "1")  # no byte for 1 s: a request fails (default 30)
    node = BucketStorage(f"{s3}/r", tmp_path / "node")
    f = node.root / "state.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"epoch 3")
    waiting, real_sleep = threading.Event(), bucket.time.sleep
    monkeypatch.setattr(bucket.time, "sleep", lambda s: (waiting.set(), real_sleep(min(s, 0.5))))
    os.killpg(s3_server.proc.pid, signal.SIGSTOP)  # the store stops answering (a restart, a partition)
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(done=node.push(f) or True))
        t.start()
        assert waiting.wait(120)  # kdp is retrying: the SDK's own attempts are spent
        os.killpg(s3_server.proc.pid, signal.SIGCONT)
        t.join(120)
        assert result.get("done") and node.exists(f)

        node.retry_s = 1.0
        os.killpg(s3_server.proc.pid, signal.SIGSTOP)
        with pytest.raises(StorageError, match=r"s3://.*/r: .*gave up after \d+ tries") as e:
            node.push(f)
        assert str(e.value).count("\n") == 0
    finally:
        os.killpg(s3_server.proc.pid, signal.SIGCONT)


@pytest.mark.slow  # a store's outage timed out for real, 6-9 s: CI
def test_training_goes_on_while_a_state_push_waits_on_a_paused_store(s3, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("KDP_STORE_TIMEOUT_S", "1")
    node = BucketStorage(f"{s3}/r", tmp_path / "node")
    state = node.root / "state" / "teacher.pt"
    state.parent.mkdir(parents=True)
    retrying, real_sleep = threading.Event(), bucket.time.sleep
    monkeypatch.setattr(bucket.time, "sleep", lambda s: (retrying.set(), real_sleep(min(s, 0.5))))
    epochs = []
    os.killpg(s3_server.proc.pid, signal.SIGSTOP)
    try:
        with publishing(lambda epoch, m: epochs.append(epoch), node, state) as hook:
            def train():  # five epochs, each writing its state and asking for it to be published
                for epoch in range(5):
                    state.write_bytes(f"epoch {epoch}".encode())
                    hook(epoch, {"loss": 1.0})
            t = threading.Thread(target=train)
            t.start()
            t.join(60)
            assert not t.is_alive() and epochs == [0, 1, 2, 3, 4]  # never blocked on the store
            assert retrying.wait(60)  # while the first push is still retrying
            os.killpg(s3_server.proc.pid, signal.SIGCONT)
        node_b = BucketStorage(f"{s3}/r", tmp_path / "b")  # the newest state is in the bucket
        assert node_b.pull(node_b.root / "state" / "teacher.pt")
        assert (node_b.root / "state" / "teacher.pt").read_bytes() == b"epoch 4"
    finally:
        os.killpg(s3_server.proc.pid, signal.SIGCONT)


@pytest.mark.slow  # a store's outage timed out for real, 6-9 s: CI
def test_a_failed_background_push_fails_the_stage_in_one_line(s3, s3_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDP_STORE_TIMEOUT_S", "1")
    node = BucketStorage(f"{s3}/r", tmp_path / "node")
    node.retry_s = 0.5
    state = node.root / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"epoch 0")
    os.killpg(s3_server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StorageError, match=r"gave up after \d+ tries") as e:
            with publishing(lambda epoch, m: None, node, state) as hook:
                hook(0, {"loss": 1.0})
        assert str(e.value).count("\n") == 0
        with pytest.raises(KeyboardInterrupt):  # an error on its way is never replaced by the push's
            with publishing_each(node, state) as pub:
                pub.request()
                raise KeyboardInterrupt
        assert "could not publish" in capsys.readouterr().out
    finally:
        os.killpg(s3_server.proc.pid, signal.SIGCONT)


def test_a_push_while_an_error_is_raised_is_logged_not_raised_over_it(s3, tmp_path, monkeypatch):
    from conftest import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens: pushes fail
    node = BucketStorage(f"{s3}/r", tmp_path / "node")
    node.retry_s = 0.0
    f = node.root / "events" / "x.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("{}\n")
    lines = []
    with pytest.raises(RuntimeError, match="the stage's own error"):
        try:
            raise RuntimeError("the stage's own error")
        except BaseException:
            publish_quietly(node, f, lines.append)
            raise
    assert len(lines) == 1 and lines[0].startswith(f"[storage] could not publish {f}")


def test_errors_name_their_real_cause(tmp_path):
    assert "access denied" not in why(OSError("When reading information for key 'runs/exp403/x': AWS Error "
                                              "NO_SUCH_KEY (HTTP status code: 404)"))
    assert "access denied" in why(OSError("AWS Error ACCESS_DENIED during HeadObject (HTTP status code: 403)"))
    with pytest.raises(StorageError, match="/dev: cannot write this node's copy"):
        with local_write(Path("/dev/full")) as out:  # a full local disk: the node's, not the bucket's
            out.write(b"x" * 65536)


def test_checkpoints_and_states_reach_the_disk_before_they_are_renamed(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    save_state(tmp_path / "state" / "teacher.pt", {"epoch": 3})
    assert synced[0].startswith(str(tmp_path / "state" / ".teacher.pt.tmp-"))  # the data, before the rename
    assert synced[1] == str(tmp_path / "state")  # then the directory entry
    assert pafs  # the module under test talks to pyarrow: keep its import honest


@pytest.mark.slow  # two tiny runs at once, then two more: about 25 s on 2 cores
def test_two_runs_of_one_name_at_once_then_a_third_skips_all_and_a_deleted_stage_is_made_again(
        s3, s3_server, tmp_path, cifar_subset_dir):
    import subprocess
    import sys

    from kdp.results import load

    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "kdp", "run", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out",
            f"{s3}/runs", "--set", "baselines=", "--set", "eval.threat_models=classifier", "--set",
            "eval.attacks=fgsm", "--set", "students=at+nt", "--set", "data.n_test=16"]

    def node(name: str) -> dict:  # each process a node of its own: its own scratch, the shared bucket
        return {**os.environ, "KDP_SCRATCH": str(tmp_path / name), "OMP_NUM_THREADS": "1"}

    both = [subprocess.Popen(argv, cwd=repo, env=node(n), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for n in ("a", "b")]
    outs = [p.communicate(timeout=600)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    third = subprocess.run(argv, cwd=repo, env=node("c"), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    stages = ("classifier", "aes", "teacher_at", "teacher_nt", "student_kd_at_nt", "evaluate")
    assert all(f"[{s}] done already" in third.stdout for s in stages), third.stdout
    assert len(load(f"{s3}/runs")) == 4 * 3  # (none, two teachers, a student) x (clean, fgsm, the worst case)

    s3_server.admin().delete_dir(f"{s3[5:]}/runs/tiny/teacher_nt")  # to train it again
    fourth = subprocess.run(argv, cwd=repo, env=node("c"), capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0, fourth.stderr
    # made again (from its training state, which the bucket still holds), not taken from node c's mirror
    assert "[teacher_nt] resumed" in fourth.stdout and "[teacher_nt] finished" in fourth.stdout, fourth.stdout
    assert "[teacher_nt] done already" not in fourth.stdout
    assert "[teacher_at] done already" in fourth.stdout


def test_environment_failures_are_one_line_also_from_inside_ray(tmp_path, capsys, cifar_subset_dir):
    from ray.exceptions import RayTaskError

    def remote_failure():  # what ray.get raises for a task that raised StorageError on a node
        raise RayTaskError("eval_shard", "Traceback (most recent call last):\n  File remote\n",
                           StorageError("s3://b/runs: cannot reach the endpoint http://x")).as_instanceof_cause()

    assert commands.run_command("kdp", remote_failure) == 2
    assert capsys.readouterr().err == "kdp: error: s3://b/runs: cannot reach the endpoint http://x\n"
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    assert cli.main(["run", "--preset", "tiny", "--data-dir", str(cifar_subset_dir), "--out", str(blocker / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{blocker / 'o'}: cannot write the output root (Not a directory)" in err


@pytest.mark.slow  # a store's outage timed out for real, 6-9 s: CI
def test_tunes_own_store_errors_are_one_line_naming_the_uri(monkeypatch):
    from ray import tune

    from kdp.distributed.sweep import tune_storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the store went away after the preflight
    with pytest.raises(StorageError) as e:
        with tune_storage("s3://b/runs/sw/tune"):
            tune.Tuner.can_restore("s3://b/runs/sw/tune")  # Tune's own pyarrow call: a raw OSError
    assert str(e.value) == "s3://b/runs/sw/tune: Tune could not use the store: cannot reach the endpoint http://127.0.0.1:9"
    with pytest.raises(OSError, match="disk full"):  # a local output's OSError is not the store's
        with tune_storage("/tmp/runs/sw/tune"):
            raise OSError("disk full")
