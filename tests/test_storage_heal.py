"""No commit broken for good (kdp.bucket_dirs), against the real S3 server: each way a committed
directory could lose its files or disagree with them, forced with the real store (a wrapper
that runs the other party's step just before a chosen call, tests/s3_faults.py), and each ends
with a fresh node and the node that made the artifact both getting it whole."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import wait_until
from kdp import bucket_dirs
from kdp.bucket_io import MANIFEST
from kdp.files import atomic_dir
from kdp.storage import BucketStorage
from s3_faults import inject

# CI's tier: make test keeps the healing path through `kdp run` (tests/test_storage_pipeline.py)
pytestmark = pytest.mark.slow


def _make(d: Path, tag: bytes) -> Path:
    """A checkpoint-like directory whose every file says which content it is (`tag`)."""
    with atomic_dir(d) as tmp:
        (tmp / "model.pt").write_bytes(tag * 3000)
        (tmp / "checkpoint.json").write_text(json.dumps({"made_from": tag.decode()}))
    return d


def _is(d: Path, tag: bytes) -> bool:
    """Is `d` that content whole, with a local commit copy that lists exactly its files?"""
    commit = json.loads((d / MANIFEST).read_text())
    return (d / "model.pt").read_bytes() == tag * 3000 and json.loads((d / "checkpoint.json").read_text()) == {
        "made_from": tag.decode()} and bucket_dirs.snapshot_of(d) == commit["files"]


def _fresh(s3, tmp_path, name: str = "fresh") -> tuple[BucketStorage, Path]:
    node = BucketStorage(f"{s3}/r", tmp_path / name)
    return node, node.root / "classifier"


def _version(d: Path) -> str:
    return json.loads((d / MANIFEST).read_text())["version"]


def _key(s3, d: Path, name: str) -> str:
    return f"{s3[5:]}/r/classifier/.kdp-v/{_version(d)}/{name}"


def test_a_cleanup_listing_an_old_version_never_deletes_a_republished_commit(s3, tmp_path):
    """B's cleanup lists A's old version; before its delete A publishes the same bytes again
    and commits: A's new commit names a version of its own (a nonce), so the delete takes
    only the old one."""
    a, b = BucketStorage(f"{s3}/r", tmp_path / "a"), BucketStorage(f"{s3}/r", tmp_path / "b")
    da = _make(a.root / "classifier", b"A")
    a.push(da)
    b.push(_make(b.root / "classifier", b"B"))  # supersedes A's version
    inject(b, "delete_dir", lambda key: "/.kdp-v/" in key, lambda *_: a.push(da))
    assert b.collect(b.root / "classifier", keep=_version(b.root / "classifier"), grace_s=0)
    fresh, d = _fresh(s3, tmp_path)
    assert fresh.pull(d) and _is(d, b"A")
    assert a.pull(da) and _is(da, b"A")


def test_a_version_committed_after_a_cleanups_listing_is_not_deleted(s3, s3_server, tmp_path, monkeypatch):
    """A has uploaded its version and is paused before its commit; B publishes, and its cleanup
    (grace 0) lists A's version as uncommitted; A's commit lands before B deletes it. B reads
    the commit again before the delete: A's version is kept, and A has nothing to heal."""
    monkeypatch.setattr(bucket_dirs, "GRACE_S", 0.0)
    a, b = BucketStorage(f"{s3}/r", tmp_path / "a"), BucketStorage(f"{s3}/r", tmp_path / "b")
    da, db = _make(a.root / "classifier", b"A"), _make(b.root / "classifier", b"B")
    commit_key = f"{s3[5:]}/r/classifier/{MANIFEST}"
    reads = []

    def a_commit_lands(*_):  # A's commit, as A is about to PUT it
        version = next(k for m, k in a.fs.calls if m == "open_output_stream").split("/.kdp-v/")[1].split("/")[0]
        commit = {"files": bucket_dirs.snapshot_of(da), "version": version}
        with s3_server.admin().open_output_stream(commit_key) as out:
            out.write(json.dumps(commit, sort_keys=True).encode())

    def b_publishes(*_):
        inject(b, "open_input_stream", lambda key: key == commit_key and len(reads.append(key) or reads) == 2,
               a_commit_lands)  # B's second read of the commit: its cleanup's, after the listing
        b.push(db)
    inject(a, "open_output_stream", lambda key: key == commit_key, b_publishes)
    a.push(da)
    assert a.fs.fired == 1 and b.fs.fired == 1
    version = _version(da)
    assert not [k for m, k in b.fs.calls if m == "delete_dir" and version in k]
    assert len([k for m, k in a.fs.calls if m == "open_output_stream" and "/.kdp-v/" in k]) == 2  # no healing
    fresh, d = _fresh(s3, tmp_path)
    assert fresh.pull(d) and _is(d, b"A")


def test_a_writer_paused_past_the_grace_heals_the_commit_it_makes(s3, tmp_path, monkeypatch, capsys):
    """A has uploaded its version and is paused before its commit; B publishes and its cleanup
    (grace 0) deletes A's uncommitted version; A then commits it. A checks its commit, uploads
    the deleted files again: a fresh node gets A's version whole."""
    monkeypatch.setattr(bucket_dirs, "GRACE_S", 0.0)
    a, b = BucketStorage(f"{s3}/r", tmp_path / "a"), BucketStorage(f"{s3}/r", tmp_path / "b")
    da, db = _make(a.root / "classifier", b"A"), _make(b.root / "classifier", b"B")
    inject(a, "open_output_stream", lambda key: key.endswith(MANIFEST), lambda *_: b.push(db))
    a.push(da)
    assert a.fs.fired == 1
    fresh, d = _fresh(s3, tmp_path)
    assert fresh.pull(d) and _is(d, b"A")
    assert a.pull(da) and _is(da, b"A") and "taken as not made" not in capsys.readouterr().err


def test_two_processes_on_one_mirror_never_commit_what_they_did_not_upload(s3, tmp_path):
    """P1 publishes; just before its first upload, P2 (same KDP_SCRATCH) replaces the directory
    whole and publishes it. P1 starts over on what is there: every commit names its objects and
    the mirror's commit copy its files."""
    p1, p2 = BucketStorage(f"{s3}/r", tmp_path / "m"), BucketStorage(f"{s3}/r", tmp_path / "m")
    d = _make(p1.root / "classifier", b"A")

    def p2_replaces(*_):
        _make(d, b"B")
        p2.push(d)
    inject(p1, "open_output_stream", lambda key: "/.kdp-v/" in key, p2_replaces)
    p1.push(d)
    assert p1.fs.fired == 1 and _is(d, b"B")
    fresh, got = _fresh(s3, tmp_path)
    assert fresh.pull(got) and _is(got, b"B")


def test_a_file_rewritten_in_place_under_the_upload_starts_the_publish_over(s3, tmp_path):
    """A file changed in place between the hash and the upload (not kdp's way of writing, but
    another tool's): the sha256 of the bytes sent differs, and the publish starts over."""
    p1 = BucketStorage(f"{s3}/r", tmp_path / "m")
    d = _make(p1.root / "classifier", b"A")
    inject(p1, "open_output_stream", lambda key: key.endswith("model.pt"),
           lambda *_: (d / "model.pt").write_bytes(b"C" * 3000))
    p1.push(d)
    fresh, got = _fresh(s3, tmp_path)
    assert fresh.pull(got) and (got / "model.pt").read_bytes() == b"C" * 3000


def test_objects_deleted_behind_kdps_back_are_a_stage_not_made_until_the_maker_heals_them(
        s3, s3_server, tmp_path, capsys):
    a = BucketStorage(f"{s3}/r", tmp_path / "a")
    da = _make(a.root / "classifier", b"A")
    a.push(da)
    s3_server.admin().delete_file(_key(s3, da, "model.pt"))  # a lifecycle rule, an operator
    fresh, d = _fresh(s3, tmp_path)
    assert not fresh.pull(d) and not d.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{s3}/r/classifier: the files its commit names are gone; taken as not made" \
        in err, err
    assert a.pull(da) and _is(da, b"A")  # the maker's own copy: its commit is the bucket's
    a.push(da)  # what run_stage does after every stage: the commit's objects are checked, and healed
    assert fresh.pull(d) and _is(d, b"A")


def test_an_object_overwritten_behind_kdps_back_is_found_and_healed(s3, s3_server, tmp_path, capsys):
    a = BucketStorage(f"{s3}/r", tmp_path / "a")
    da = _make(a.root / "classifier", b"A")
    a.push(da)
    admin, commit_key = s3_server.admin(), f"{s3[5:]}/r/classifier/{MANIFEST}"
    committed = admin.get_file_info(commit_key).mtime_ns

    def later() -> bool:  # the server's clock past the commit's second (its times are whole seconds)
        with admin.open_output_stream(f"{s3[5:]}/clock") as out:
            out.write(b"")
        return admin.get_file_info(f"{s3[5:]}/clock").mtime_ns > committed
    wait_until(later, 10, "the server's clock did not move", interval=0.1)
    with admin.open_output_stream(_key(s3, da, "model.pt")) as out:
        out.write(b"Z" * 3000)  # the same size, other bytes
    fresh, d = _fresh(s3, tmp_path)
    assert not fresh.pull(d)
    assert "model.pt: does not match the sha256 in its commit" in capsys.readouterr().err
    a.push(da)
    assert fresh.pull(d) and _is(d, b"A")


@pytest.mark.parametrize("commit", [b"{not json", json.dumps({"files": {"a\0b": [1, "0" * 64]}}).encode(),
                                    b" " * (9 << 20)], ids=["corrupt", "nul-name", "9MiB"])
def test_a_broken_commit_is_a_stage_not_made_and_a_publish_replaces_it(s3, s3_server, tmp_path, capsys, commit):
    a = BucketStorage(f"{s3}/r", tmp_path / "a")
    da = _make(a.root / "classifier", b"A")
    a.push(da)
    with s3_server.admin().open_output_stream(f"{s3[5:]}/r/classifier/{MANIFEST}") as out:
        out.write(commit)
    fresh, d = _fresh(s3, tmp_path)
    assert not fresh.pull(d)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "taken as not made" in err and "\0" not in err, err
    assert not a.pull(da) and not da.exists()  # the bucket is the truth: the maker makes it again too
    a.push(_make(da, b"A"))
    assert fresh.pull(d) and _is(d, b"A")


def test_an_interrupted_pull_then_a_commit_flipped_back_leaves_one_version_whole(s3, s3_server, tmp_path):
    """A node holds version A; the bucket moves to B; the node's pull of B dies after its first
    file; the bucket's commit goes back to A. The node ends with A's files, never B's beside A's."""
    w = BucketStorage(f"{s3}/r", tmp_path / "w")
    dw = _make(w.root / "classifier", b"A")
    w.push(dw)
    commit_a = json.loads((dw / MANIFEST).read_text())
    node, d = _fresh(s3, tmp_path, "node")
    assert node.pull(d) and _is(d, b"A")
    w.push(_make(dw, b"B"))
    opened = []

    def dies_on_the_second_file(key):
        opened.append(key)
        if len(opened) == 2:
            raise KeyboardInterrupt  # the node killed mid-pull
    inject(node, "open_input_stream", lambda key: "/.kdp-v/" in key, dies_on_the_second_file, every=True)
    with pytest.raises(KeyboardInterrupt):
        node.pull(d)
    assert _is(d, b"A")  # nothing of B in the old copy
    with s3_server.admin().open_output_stream(f"{s3[5:]}/r/classifier/{MANIFEST}") as out:
        out.write(json.dumps(commit_a, sort_keys=True).encode())
    assert node.pull(d) and _is(d, b"A") and json.loads((d / MANIFEST).read_text()) == commit_a


def test_a_file_the_commit_does_not_list_is_removed_from_the_mirror(s3, tmp_path):
    """docs/object-storage.md: the bucket is the truth, also for a file put into a mirror copy."""
    a = BucketStorage(f"{s3}/r", tmp_path / "a")
    da = _make(a.root / "classifier", b"A")
    a.push(da)
    (da / "stray.bin").write_bytes(b"x")
    assert a.pull(da) and not (da / "stray.bin").exists() and _is(da, b"A")


def test_a_pull_beside_a_publish_of_the_same_bytes_records_the_commit_without_swapping_the_directory(s3, tmp_path):
    """Two trials on one node: one published an AE cache entry and has not yet written its local
    commit copy when the other's task pulls it. The pull must not swap the directory from under
    the publish (seen in CI: the publish failed 3 times, 'kept changing while it was
    published'): the copy holds the committed bytes, so the commit is recorded in place."""
    a = BucketStorage(f"{s3}/r", tmp_path / "a")
    da = _make(a.root / "classifier", b"A")
    a.push(da)
    (da / MANIFEST).unlink()  # the maker between its commit PUT and its local copy of it
    inode = da.stat().st_ino
    assert a.pull(da) and da.stat().st_ino == inode and _is(da, b"A")
    (da / "model.pt").write_bytes(b"B" * 3000)  # other bytes: the bucket's version is mirrored whole
    (da / MANIFEST).unlink()
    assert a.pull(da) and da.stat().st_ino != inode and _is(da, b"A")
