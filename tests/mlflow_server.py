"""A real MLflow tracking server for the --mlflow tests: `mlflow server` on a local file store
(the store the issue names; MLflow 3 wants MLFLOW_ALLOW_FILE_STORE for it), in a venv of its
own (<repo>/.venv-mlflow, built once from tests/mlflow-server.lock with the uv of kdp's venv,
or pip on its route; mlflow cannot share kdp's lock). It listens on 127.0.0.1 on a free port
and is stopped by its own process group, never by name."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = Path(__file__).with_name("mlflow-server.lock")
VENV = REPO / ".venv-mlflow"


def server_venv() -> Path:
    """The server's venv, (re)built when the lock changed since its stamp; its `mlflow`."""
    stamp, want = VENV / "kdp-lock.sha256", hashlib.sha256(LOCK.read_bytes()).hexdigest()
    if not (stamp.is_file() and stamp.read_text() == want):
        uv = Path(sys.executable).parent / "uv"
        clean = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}  # the README's route: no local wheels
        if uv.is_file():
            subprocess.run([str(uv), "venv", "-q", "--clear", "--python", sys.executable, str(VENV)], check=True)
            subprocess.run([str(uv), "pip", "install", "-q", "--python", str(VENV / "bin" / "python"), "-r", str(LOCK)],
                           check=True, env=clean)
        else:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
            subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "-r", str(LOCK)], check=True,
                           env={**clean, "PIP_CONFIG_FILE": "/dev/null"})
        stamp.write_text(want)
    return VENV / "bin" / "mlflow"


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its store in `store`; `uri` is what --mlflow takes."""

    def __init__(self, store: Path, port: int):
        self.store, self.uri = Path(store), f"http://127.0.0.1:{port}"
        self.store.mkdir(parents=True, exist_ok=True)
        self.log = open(self.store.parent / "mlflow-server.log", "w")
        self.proc = subprocess.Popen(
            [str(server_venv()), "server", "--backend-store-uri", f"file:{self.store}", "--default-artifact-root",
             str(self.store / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def up(self) -> bool:
        """Does it answer (any HTTP status: its API is up)?"""
        if self.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited {self.proc.returncode}: "
                               f"{(self.store.parent / 'mlflow-server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.log.close()
