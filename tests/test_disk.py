"""A local disk that refuses a write (full, read-only, a file in the way) is one line naming the
directory and the cause, for every kind of artifact, with nothing of it left; `kdp run` exits 2
and the same command resumes once there is room. The full and read-only disks are real: a
small tmpfs mounted in a user and mount namespace of the test's own (`unshare -rm`)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster_sim import can_unshare
from conftest import REDUCED
from kdp.errors import DiskError
from kdp.files import atomic_dir, atomic_path

REPO = Path(__file__).resolve().parents[1]
needs_unshare = pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user and mount namespaces")

# every kind of artifact, written by kdp's own writer into the directory argv[1]
WRITERS = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    from kdp.checkpoint import save_checkpoint, save_state
    from kdp.events import log_event
    from kdp.plots import _save
    from kdp.results import SCHEMA, write_results
    from kdp.stages.eval_cache import save_entry
    import matplotlib.pyplot as plt

    d = Path(sys.argv[1])
    kinds = {
        "checkpoint": lambda: save_checkpoint(d / "ckpt", torch.nn.Linear(300, 300), {"kind": "classifier"}, {}),
        "state": lambda: save_state(d / "state" / "s.pt", {"w": torch.zeros(200_000)}),
        "aes": lambda: save_entry(d / "cache" / "k", torch.zeros(300, 3, 32, 32), {"n": 300}),
        "results": lambda: write_results([{"variant": "x" * 5000}], d / "results.parquet"),
        "report": lambda: _save(plt.figure(), d / "report" / "plot.png"),
        "events": lambda: log_event(d / "run", "stage", "started", pad="x" * 5000),
    }
    for kind, write in kinds.items():
        try:
            write()
            got = {"type": None}
        except BaseException as e:
            got = {"type": type(e).__name__, "msg": str(e)}
        got["left"] = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "filler")
        events = [p for p in d.rglob("*.jsonl")]  # an append log: whole lines only, none torn
        assert all(p.read_bytes() == b"" or p.read_bytes().endswith(b"\\n") for p in events)
        print(json.dumps({kind: got}), flush=True)
""")


def _in_small_tmpfs(script: str, size: str = "1m", timeout: float = 300) -> subprocess.CompletedProcess:
    """`script` (sh, $D the tmpfs) in a namespace of its own with a tmpfs of `size` at $D."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'D=$(mktemp -d) && mount -t tmpfs -o size={size} tmpfs "$D" '
                           f'&& cd "{REPO}" && {script}'], capture_output=True, text=True, timeout=timeout)


def _kinds(out: str) -> dict:
    return {k: v for line in out.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}


@needs_unshare
@pytest.mark.slow  # a tmpfs per case, 2.5 s each: CI (make test keeps the file in the way)
@pytest.mark.parametrize("how,cause", [("full", "no space left on the device"), ("ro", "a read-only file system")])
def test_every_artifact_kind_refused_by_the_disk_is_one_line_with_nothing_left(how, cause):
    spoil = {"full": 'dd if=/dev/zero of="$D/filler" bs=64k 2>/dev/null; ',
             "ro": 'mount -o remount,ro "$D" && '}[how]
    proc = _in_small_tmpfs(f'{spoil}{sys.executable} -c "$W" "$D"'.replace('"$W"', _quote(WRITERS)))
    got = _kinds(proc.stdout)
    assert set(got) == {"checkpoint", "state", "aes", "results", "report", "events"}, proc.stdout + proc.stderr
    for kind, r in got.items():
        assert r["type"] == "DiskError", (kind, r)
        assert f"cannot write ({cause}" in r["msg"] and "\n" not in r["msg"], (kind, r)
        left = [p for p in r["left"] if not (kind == "events" and p.startswith("run/events/"))]
        assert left == [], (kind, r)  # nothing half-written, no temporary file (an event file: see below)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def test_a_file_in_the_way_is_one_line_naming_it(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    for ctx in (atomic_path(tmp_path / "out" / "run" / "x.json"), atomic_dir(tmp_path / "out" / "ckpt")):
        with pytest.raises(DiskError) as e:
            with ctx as tmp:
                tmp.write_text("{}")
        assert str(e.value).startswith(f"{tmp_path / 'out'}") and "a file is in the way" in str(e.value), e.value


@needs_unshare
@pytest.mark.slow  # two reduced tiny runs in a 4 MiB tmpfs: about 60 s on 2 cores
def test_kdp_run_on_a_full_disk_exits_2_in_one_line_and_resumes_once_there_is_room(cifar_subset_dir):
    """The classifier fits in 4 MiB, the training AEs (12 MiB) do not: one line naming the cache
    directory, exit 2, no entry and no temporary file; with the tmpfs grown to 64 MiB the same
    command keeps the classifier and finishes."""
    run = (f"{sys.executable} -m kdp run --preset tiny --data-dir {cifar_subset_dir} --out \"$D/out\" --quiet "
           + " ".join(REDUCED))
    script = (f'OMP_NUM_THREADS=1 {run} 2>"$D.err"; echo "rc=$?"; cat "$D.err"; '
              'find "$D/out" -name "*.tmp-*" -o -path "*/cache/aes/*" | sed "s/^/left: /"; '
              f'mount -o remount,size=64m "$D" && OMP_NUM_THREADS=1 {run}; echo "rc=$?"')
    proc = _in_small_tmpfs(script, size="4m", timeout=600)
    out = proc.stdout
    assert "rc=2\n" in out, out + proc.stderr
    err = [line for line in out.split("rc=2\n", 1)[1].splitlines() if line.startswith("kdp")]
    assert len(err) == 1 and "/out/cache/aes: cannot write (no space left on the device" in err[0], out
    assert "left: " not in out, out
    assert out.rstrip().endswith("rc=0") and "[classifier] done already" in out.rsplit("rc=2", 1)[1], out
