"""`--ray-address` that nothing answers (issue 17 item 6): one error line naming the address, in
seconds, before anything is planned; for every command that takes it."""

import re
import socket
import time

import pytest
import yaml
from cli_checks import one_error_line
from model_factory import addt_job, attack_job, tiny_job
from typer.testing import CliRunner

from flows.cli import app
from tasks.common.raypool import RayAddressError, check_ray_address

runner = CliRunner()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize("command, job", [("certify", tiny_job), ("attack", attack_job), ("train-addt", addt_job)])
def test_an_address_nothing_answers_fails_in_seconds_naming_it(command, job, tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(tmp_path)))
    start = time.monotonic()
    result = runner.invoke(app, [command, "--config", str(config), "--ray-address", address])
    assert time.monotonic() - start < 15
    assert result.exit_code == 1
    message = one_error_line(result)
    assert address in message and "no Ray cluster answers" in message and "leave out --ray-address" in message
    assert not (tmp_path / "out").exists()  # nothing planned


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:port", ":6379"])
def test_a_malformed_address_says_the_expected_form(address):
    with pytest.raises(RayAddressError, match="expected host:port"):
        check_ray_address(address)



@pytest.mark.servers
def test_joining_a_loopback_cluster_keeps_the_driver_on_loopback(tmp_path):
    """A single-node cluster on 127.0.0.1 (`ray start --head`, stopped by PID): `densepure certify
    --ray-address 127.0.0.1:PORT` runs on it, and the cluster records the driver's address as
    127.0.0.1: Ray did not rewrite it to the machine's other interface (which it then dials)."""
    import json
    import subprocess
    import sys
    import tempfile

    from server_procs import VENV_BIN, child_env, log_tail, started

    port = _closed_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="dp-rc-")  # short: Ray's socket paths must fit in 107 bytes
    cmd = ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
           "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"]
    # Token authentication said explicitly on every side (as shared/environment.md measured for
    # joining nodes): the drivers then read the token `ray start` wrote to ~/.ray/auth_token.
    env = child_env(RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=None, DENSEPURE_FAULT_PGID=None)
    log = tmp_path / "head.log"
    with started(cmd, env=dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), log=log) as head:
        deadline = time.monotonic() + 120
        while True:
            try:
                check_ray_address(address, timeout=1)
                break
            except RayAddressError:
                assert time.monotonic() < deadline, log_tail(log)
                time.sleep(0.5)
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5])))
        run = subprocess.run([f"{VENV_BIN}/densepure", "certify", "--config", str(config), "--ray-address", address],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:] + log_tail(log)
        assert "| 0.5 | rs | 6 |" in run.stdout
        assert re.search(r"computed \d+ shards, 0 already complete", run.stderr), run.stderr[-3000:]
        assert head.poll() is None  # the cluster keeps running after the run disconnects
        jobs = subprocess.run([sys.executable, "-c", (
            "import json, ray; from tasks.common.raypool import join_ray; join_ray(%r); "
            "print(json.dumps([j['DriverIPAddress'] for j in ray._private.state.jobs()]))") % address],
            env=env, capture_output=True, text=True, timeout=300)
        drivers = json.loads(jobs.stdout.strip().splitlines()[-1])
        assert len(drivers) == 2 and set(drivers) == {"127.0.0.1"}, jobs.stdout + jobs.stderr[-2000:]
