"""Real servers in tests: start a process with its log in a file, wait until it answers, stop it by PID.

Every test that starts a server (Prefect server and worker, Ray nodes, moto) starts it through
:func:`started`, a context manager whose ``finally`` stops that PID whatever the test did, so
a failing assertion never leaves a server behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**changes: str | None) -> dict[str, str]:
    """This process's environment with the venv's bin first on PATH (the infra scripts call
    ``prefect``, ``ray`` and ``densepure`` by name) and ``changes`` applied (None removes)."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no log at {path})"


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop ``proc`` and what it started: SIGTERM to its process group (its PID: :func:`started`
    makes it a group leader), then SIGKILL to the group if the leader is still there after
    ``timeout``, and a last SIGKILL to the group for children that outlived their leader
    (a Prefect worker's flow-run process, say)."""
    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    if proc.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            proc.wait()
    signal_group(signal.SIGKILL)


@contextlib.contextmanager
def started(cmd: list[str], *, env: Mapping[str, str], log: Path, cwd: Path | str = ROOT) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in the background (stdout and stderr to ``log``) as the leader of a new process
    group; on exit, stop that group (:func:`stop`), also when the test failed."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until ``url`` answers 2xx; fail with the server's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}) before {url} answered:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{log_tail(log)}")
            time.sleep(0.5)
