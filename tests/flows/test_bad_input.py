"""Bad input through the whole command: quarantine or fail-fast, clear errors, no secret leaked."""

import json
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from model_factory import tiny_job
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def bad_job(tmp, policy):
    data = tiny_job(tmp, sigmas=[0.5], methods=[{"kind": "rs"}, {"kind": "dds"}], shard_size=3,
                    on_bad_input=policy)
    data["dataset"].pop("image_size")  # images are used as they are: a wrong size is caught
    root = tmp / "data"
    (root / "b" / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / "b" / "wrong_size.png")
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    return data, config


def test_quarantine_records_bad_images_and_certifies_the_rest(tmp_path):
    data, config = bad_job(tmp_path, "quarantine")
    result = runner.invoke(app, ["certify", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = data["out"]
    assert "3 image(s) quarantined" in result.output
    errors = runner.invoke(app, ["sql", out, "SELECT method, image_id, error_type FROM errors ORDER BY 1, 2",
                                 "--format", "json"])
    assert json.loads(errors.output) == [
        {"method": "dds", "image_id": "b/corrupt.png", "error_type": "DatasetError"},
        {"method": "dds", "image_id": "b/wrong_size.png", "error_type": "DatasetError"},
        {"method": "rs", "image_id": "b/corrupt.png", "error_type": "DatasetError"},  # RS resizes: only corrupt
    ]
    certs = pq.read_table(f"{out}/tables/certificates.parquet").to_pylist()
    assert sorted((c["method"], c["image_id"]) for c in certs if c["image_id"].startswith("b/")) == [
        ("dds", "b/0.png"), ("dds", "b/1.png"), ("dds", "b/2.png"),
        ("rs", "b/0.png"), ("rs", "b/1.png"), ("rs", "b/2.png"), ("rs", "b/wrong_size.png")]
    report = open(f"{out}/report.md").read()
    assert "3 image(s) quarantined" in report and "cannot be decoded" in report
    # A rerun computes nothing: quarantined images count as done for their shard.
    again = runner.invoke(app, ["certify", "--config", str(config)], catch_exceptions=False)
    assert "computed 0 shards" in again.output


def test_fail_fast_names_the_image_and_keeps_finished_shards(tmp_path):
    data, config = bad_job(tmp_path, "fail")
    result = runner.invoke(app, ["certify", "--config", str(config)])
    assert result.exit_code == 1
    assert "corrupt.png" in result.output and "cannot be decoded" in result.output
    # The command ends with one clear error (pytest's log capture may add Prefect's own records above it).
    tail = result.output[result.output.rindex("error: "):]
    assert tail.startswith("error: image") and "on_bad_input: quarantine" in tail and "Traceback" not in tail
    kept = list((tmp_path / "out" / "votes").rglob("*.parquet"))
    assert kept  # shards finished before the failure stay; a rerun resumes from them
    assert not (tmp_path / "out" / "tables").exists()  # no table published over a failed run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_s3_endpoint_is_a_clear_error_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "TOPSECRET-do-not-print")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp_path)))
    result = runner.invoke(app, ["certify", "--config", str(config), "--out", "s3://nowhere-bucket/run"])
    assert result.exit_code == 1
    assert "s3://nowhere-bucket/run" in result.output and "AWS_ENDPOINT_URL_S3" in result.output
    assert "TOPSECRET" not in result.output and "AKIAEXAMPLEKEYID" not in result.output


@pytest.mark.parametrize("field, value, message", [
    ("n", "0", "n: Input should be greater than or equal to 1"),
    ("sigmas", "[0.25, -1]", "sigmas: every sigma must be a finite number > 0"),
    ("alpha", "1.5", "alpha: Input should be less than 1"),
])
def test_invalid_config_values_are_refused_before_any_work(tmp_path, field, value, message):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp_path)))
    result = runner.invoke(app, ["certify", "--config", str(config), "--set", f"{field}={value}"])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()
