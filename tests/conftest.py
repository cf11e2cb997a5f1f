"""Shared pytest fixtures (generic ones only; module-specific fixtures live in their test file)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

# One intra-op thread: on the 2-core dev/CI machine, two OpenMP threads per process fighting other
# processes made the tiny UNets ~30x slower. Numerics are unaffected (results are per row).
torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def _moto_server():
    """A real S3 endpoint (moto_server) on loopback for the whole session; yields its URL.

    Started once (~1 s) and terminated by PID at the end of the session.
    """
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_endpoint(_moto_server, monkeypatch):
    """URL of a loopback S3 endpoint (moto), with dummy credentials and region in the environment.

    Pass it as ``storage_options={"endpoint_url": s3_endpoint}`` (s3fs) or set
    ``AWS_ENDPOINT_URL_S3``. The server is shared by the session: use a fresh bucket per test.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return _moto_server
