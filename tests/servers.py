"""An ``mlflow server`` on 127.0.0.1 for the tests that need a tracking server (one start-up, used
by the SQLite-backed server of the model-safety test and the PostgreSQL one of the tracking test)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, root: Path, *, workers: int, log_name: str, timeout_s: float):
    """Start ``mlflow server`` on a free loopback port with proxied artifacts under ``root``; yield its
    URL once ``/health`` answers 200 (the server's log in the assertion if it dies or is late); stop
    its process group at the end."""
    port = free_port()
    log_path = root / log_name
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", str(workers), "--backend-store-uri", backend_store_uri,
                             "--artifacts-destination", str(root / "server-artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"mlflow server did not answer within {timeout_s:.0f} s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
