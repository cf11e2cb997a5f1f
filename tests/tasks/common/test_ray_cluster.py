"""--ray-address: the vote stage joins an existing Ray cluster instead of starting one."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from model_factory import tiny_job


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_certify_joins_an_existing_cluster(tmp_path):
    """`densepure certify --ray-address` uses a running cluster and leaves it running.

    The command runs in its own process: a fresh driver, as a user's would be (an in-process
    driver would inherit the Ray state of earlier tests).
    """
    port = free_port()
    temp = tempfile.mkdtemp(prefix="dp-rc-")  # short: Ray's socket paths must fit in 107 bytes
    # A loopback-only test cluster without token auth; a real cluster sets RAY_AUTH_MODE /
    # RAY_AUTH_TOKEN for its head, workers and drivers alike.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_LOGGING_LEVEL="ERROR")
    bin_dir = Path(sys.executable).parent
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "false",
         "--temp-dir", temp, "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None and time.monotonic() < deadline, "ray head did not start"
            time.sleep(0.5)
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(tiny_job(tmp_path, sigmas=[0.5], methods=[{"kind": "rs"}, {"kind": "dds"}])))
        run = subprocess.run([str(bin_dir / "densepure"), "certify", "--config", str(config),
                              "--ray-address", f"127.0.0.1:{port}"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "computed 6 shards, 0 already complete" in run.stderr
        assert (tmp_path / "out" / "tables" / "certificates.parquet").exists()
        assert head.poll() is None  # the cluster keeps running after the run disconnects
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
