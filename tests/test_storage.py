"""kdp.storage against a real S3 server (tests/s3_server.py): publish and fetch, the manifest
written last, sha256 checks, writers killed mid-upload, preflight errors, URI refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from conftest import _port_open, wait_until
from kdp.errors import StorageError
from kdp.storage import MANIFEST, BucketStorage, is_uri, local_only, open_storage

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _checkpoint(d: Path, size: int = 1000) -> Path:
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(os.urandom(size))
    (d / "checkpoint.json").write_text(json.dumps({"spec": {}, "config": {}}))
    (d / "sub").mkdir()
    (d / "sub" / "x.bin").write_bytes(b"x" * 10)
    return d


def test_the_test_server_listens_where_its_own_worker_dials(s3_server):
    """weed's worker dials the admin's gRPC at the admin HTTP port + 10000: the server is started
    with that port free and given, so no process of the session holds or is dialled there."""
    admin = s3_server.ports["admin.port"]
    assert s3_server.ports["admin.port.grpc"] == admin + 10000
    wait_until(lambda: _port_open(admin + 10000), 30, f"nothing listens on {admin + 10000}")
    assert len(set(s3_server.ports.values())) == len(s3_server.ports)


def test_a_directory_published_on_one_node_is_fetched_whole_on_another(s3, tmp_path):
    node_a = BucketStorage(f"{s3}/runs", tmp_path / "a")
    node_b = BucketStorage(f"{s3}/runs", tmp_path / "b")
    ckpt = _checkpoint(node_a.root / "run" / "classifier")
    assert not node_b.pull(node_b.root / "run" / "classifier")  # nothing published yet
    node_a.push(ckpt)
    assert node_b.pull(node_b.root / "run" / "classifier")
    got = _files(node_b.root / "run" / "classifier")
    assert got == _files(ckpt) and MANIFEST in got  # the writer keeps the manifest it published, too
    manifest = json.loads(got[MANIFEST])["files"]
    assert sorted(manifest) == ["checkpoint.json", "model.pt", "sub/x.bin"] and manifest["model.pt"][0] == 1000
    assert node_b.uri_of(node_b.root / "run" / "classifier") == f"{s3}/runs/run/classifier"


def test_a_single_file_is_one_object_and_a_changed_one_is_fetched_again(s3, tmp_path):
    a, b = BucketStorage(f"{s3}/r", tmp_path / "a"), BucketStorage(f"{s3}/r", tmp_path / "b")
    f = a.root / "run" / "config.json"
    f.parent.mkdir(parents=True)
    f.write_text('{"x": 1}')
    a.push(f)
    assert b.pull(b.root / "run" / "config.json") and (b.root / "run" / "config.json").read_text() == '{"x": 1}'
    f.write_text('{"x": 2}')
    a.push(f)
    assert b.pull(b.root / "run" / "config.json") and (b.root / "run" / "config.json").read_text() == '{"x": 2}'


def test_a_file_changed_in_the_bucket_is_refused_by_its_sha256(s3, s3_server, tmp_path):
    a, b = BucketStorage(f"{s3}/r", tmp_path / "a"), BucketStorage(f"{s3}/r", tmp_path / "b")
    a.push(_checkpoint(a.root / "classifier"))
    version = json.loads((a.root / "classifier" / MANIFEST).read_text())["version"]
    with s3_server.admin().open_output_stream(f"{s3[5:]}/r/classifier/.kdp-v/{version}/model.pt") as out:
        out.write(b"tampered")
    assert not b.pull(b.root / "classifier")  # taken as not made (tests/test_storage_heal.py)
    assert not (b.root / "classifier").exists()  # no local copy is taken as complete


WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from kdp.storage import BucketStorage
    store = BucketStorage(sys.argv[1], sys.argv[2])
    mode = sys.argv[3]
    if mode == "directory":  # stop after the first file, before the manifest
        real = store._upload_at
        def upload(fd, name, key):
            got = real(fd, name, key)
            print("uploaded", key, flush=True)
            time.sleep(600)
        store._upload_at = upload
        d = store.root / "classifier"
        d.mkdir(parents=True)
        (d / "checkpoint.json").write_text("{}")
        (d / "model.pt").write_bytes(os.urandom(1000))
        store.push(d)
    else:  # one big object, part by part: stop in the middle
        with store.fs.open_output_stream(store.key(store.root / "results.parquet")) as out:
            for i in range(4):
                out.write(os.urandom(6 << 20))
                print("wrote", i, flush=True)
                if i == 2:
                    time.sleep(600)
""")


@pytest.mark.parametrize("mode", ["directory", "object"])
def test_a_writer_killed_mid_upload_leaves_nothing_a_reader_takes_for_finished(s3, tmp_path, mode):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, f"{s3}/r", str(tmp_path / "w"), mode],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wanted = "uploaded" if mode == "directory" else "wrote 2"
        for line in proc.stdout:  # the event: an upload under way
            if line.startswith(wanted):
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    reader = BucketStorage(f"{s3}/r", tmp_path / "reader")
    path = reader.root / ("classifier" if mode == "directory" else "results.parquet")
    assert not reader.pull(path) and not path.exists()
    if mode == "directory":  # its first file is there (in its version), without the commit that says finished
        listing = reader.fs.get_file_info(pafs.FileSelector(reader.key(path), recursive=True))
        assert any("/.kdp-v/" in f.path and f.type == pafs.FileType.File for f in listing)
        assert not reader.exists(path / MANIFEST)


def test_preflight_names_the_uri_for_a_missing_bucket_bad_credentials_or_endpoint(s3, monkeypatch, tmp_path):
    BucketStorage(f"{s3}/runs", tmp_path).preflight()  # the good case
    with pytest.raises(StorageError, match=r"^s3://nosuchbucket/runs: no bucket 'nosuchbucket' at http://127"):
        BucketStorage("s3://nosuchbucket/runs", tmp_path).preflight()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=rf"^{s3}/runs: access denied: check the credentials"):
        BucketStorage(f"{s3}/runs", tmp_path).preflight()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(StorageError, match=rf"^{s3}/runs: cannot reach the endpoint http://127.0.0.1:9$"):
        BucketStorage(f"{s3}/runs", tmp_path).preflight()


def test_preflight_leaves_nothing_in_the_bucket(s3, s3_server, tmp_path):
    BucketStorage(f"{s3}/runs", tmp_path).preflight()
    left = s3_server.admin().get_file_info(pafs.FileSelector(s3[5:], recursive=True))
    assert [f.path for f in left if f.type == pafs.FileType.File] == []


def test_uris_are_recognised_and_refused_where_not_supported(tmp_path):
    assert is_uri("s3://b/p") and not is_uri(tmp_path) and not is_uri("runs")
    assert local_only(tmp_path / "x", "kdp cache") == (tmp_path / "x").resolve()
    with pytest.raises(StorageError, match=r"^s3://b/p: kdp cache takes a local path"):
        local_only("s3://b/p", "kdp cache")
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs'; valid: s3"):
        open_storage("gs://b/p")
    assert open_storage(tmp_path).root == tmp_path.resolve() and not open_storage(tmp_path).remote


def test_a_dataset_in_a_bucket_is_fetched_once_per_node_and_checked(s3, s3_server, tmp_path, monkeypatch,
                                                                  cifar_subset_dir):
    import torch

    from kdp.data import load_cifar

    pafs.copy_files(str(cifar_subset_dir), f"{s3[5:]}/data/cifar10-subset", destination_filesystem=s3_server.admin())
    uri = f"{s3}/data/cifar10-subset"
    got, want = load_cifar(uri, 256, 64), load_cifar(cifar_subset_dir, 256, 64)
    assert torch.equal(got.train_x, want.train_x) and torch.equal(got.test_y, want.test_y)
    assert got.source == uri and got.fingerprint() == want.fingerprint()  # the same AE cache keys as local data

    def no_download(*a, **k):
        raise AssertionError("downloaded again")
    with monkeypatch.context() as m:  # the node's copy is used as it is
        m.setattr(BucketStorage, "_download", no_download)
        load_cifar(uri, 8, 8)
    local = Path(os.environ["KDP_SCRATCH"]) / "data" / s3[5:] / "data" / "cifar10-subset" / "cifar-10-batches-py"
    batch = local / "data_batch_1"
    damaged = bytearray(batch.read_bytes())
    damaged[1000] ^= 0xFF  # same size, other content: only its sha256 tells
    batch.write_bytes(bytes(damaged))
    assert torch.equal(load_cifar(uri, 256, 64).train_x, want.train_x)  # noticed, fetched again
    with pytest.raises(FileNotFoundError, match=rf"^--data-dir {s3}/nodata: no such object or prefix at http://127"):
        load_cifar(f"{s3}/nodata")


def test_a_missing_dataset_in_a_bucket_fails_kdp_run_in_one_line(s3, tmp_path, capsys):
    from kdp import cli

    assert cli.main(["run", "--preset", "tiny", "--data-dir", f"{s3}/nodata", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kdp: error: --data-dir {s3}/nodata: no such object or prefix") and "\n" not in err
    assert not (tmp_path / "out").exists()
