"""kdp.carry: a run packed into small files on one lease and unpacked on the next resumes there:
finished stages are skipped, the AE cache is made again under the same key, the results kept."""
from __future__ import annotations

import shutil
from collections import Counter

import pytest

from conftest import tiny_argv, torch_threads
from kdp import carry, cli
from kdp.errors import CheckpointError
from kdp.events import read_events


def test_a_packed_run_unpacks_elsewhere_and_resumes_without_training(tiny_run, tmp_path, cifar_subset_dir):
    root = tmp_path / "lease1"
    shutil.copytree(tiny_run.parent, root)
    (root / "tiny" / "state").mkdir(exist_ok=True)
    (root / "tiny" / "state" / "classifier.pt").write_bytes(b"finished: left behind")
    (root / "tiny" / "state" / "teacher_zz.pt").write_bytes(b"unfinished: carried")
    m = carry.pack(root, "tiny", tmp_path / "back", chunk_mib=0.05)
    assert len(m["chunks"]) > 1 and all((tmp_path / "back" / c["name"]).stat().st_size <= 0.05 * 2**20 for c in m["chunks"])

    new = tmp_path / "lease2"
    carry.unpack(tmp_path / "back", new)
    assert (new / "tiny" / "state" / "teacher_zz.pt").read_bytes() == b"unfinished: carried"
    assert not (new / "tiny" / "state" / "classifier.pt").exists() and not (new / "cache").exists()
    for p in (tiny_run / "student_kd_at_nt").iterdir():
        assert (new / "tiny" / "student_kd_at_nt" / p.name).read_bytes() == p.read_bytes()
    (new / "tiny" / "state" / "teacher_zz.pt").unlink()
    finished = lambda: Counter(e["stage"] for e in read_events(new / "tiny") if e.get("status") == "finished")  # noqa: E731
    before = finished()
    with torch_threads(1):
        assert cli.main(tiny_argv(cifar_subset_dir, new)) == 0
    assert finished() - before == Counter({"aes": 1})  # the AE cache, crafted again; every checkpoint and the results kept
    assert (new / "tiny" / "results.parquet").read_bytes() == (tiny_run / "results.parquet").read_bytes()


def test_a_damaged_or_incomplete_carry_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "root" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    carry.pack(tmp_path / "root", "r", tmp_path / "back")
    chunk = next((tmp_path / "back").glob("r.tgz.*"))
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        carry.unpack(tmp_path / "back", tmp_path / "new")
    chunk.unlink()
    assert carry.main(["unpack", str(tmp_path / "back"), str(tmp_path / "new")]) == 2
    assert "not a complete carry" in capsys.readouterr().err
    assert carry.main(["pack", str(tmp_path / "root"), "nope", str(tmp_path / "b2")]) == 2
