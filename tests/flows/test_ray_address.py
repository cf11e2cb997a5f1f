"""`--ray-address` that nothing answers (issue 17 item 6): one error line naming the address, in
seconds, before anything is planned; for every command that takes it."""

import socket
import time

import pytest
import yaml
from cli_checks import one_error_line
from model_factory import addt_job, attack_job, tiny_job
from typer.testing import CliRunner

from flows.cli import app
from tasks.raypool import RayAddressError, check_ray_address

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

