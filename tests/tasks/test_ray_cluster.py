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

from model_factory import tiny_job

from densepure_core.config import load_config
from tasks.plan import plan_run
from tasks.vote import run_vote_stage


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vote_stage_joins_an_existing_cluster(tmp_path, monkeypatch):
    import ray
    from ray._private import ray_constants

    port = free_port()
    temp = tempfile.mkdtemp(prefix="dp-rc-")  # short: Ray's socket paths must fit in 107 bytes
    # A loopback-only test cluster without token auth (the driver here runs with auth off);
    # a real cluster sets RAY_AUTH_MODE/RAY_AUTH_TOKEN for its head, workers and drivers alike.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "false",
         "--temp-dir", temp, "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # this driver stays on loopback too
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None and time.monotonic() < deadline, "ray head did not start"
            time.sleep(0.5)
        cfg = load_config(data=tiny_job(tmp_path, sigmas=[0.5], methods=[{"kind": "rs"}, {"kind": "dds"}]))
        plan = plan_run(cfg)
        results = run_vote_stage(cfg, plan, ray_address=f"127.0.0.1:{port}")
        assert sum(r.images for r in results) == len(plan.records) * 2
        assert not ray.is_initialized()  # the stage disconnects; the cluster keeps running
        assert head.poll() is None
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
