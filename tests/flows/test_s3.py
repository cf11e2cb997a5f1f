"""The pipeline with OUT on S3 (a real moto S3 server on 127.0.0.1): certify, resume, sql."""

import json

import s3fs
import yaml
from model_factory import tiny_job
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_certify_and_query_on_s3(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("results-bucket")
    out = "s3://results-bucket/runs/tiny"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp_path, sigmas=[0.5], methods=[{"kind": "rs"}, {"kind": "dds"}])))

    result = runner.invoke(app, ["certify", "--config", str(config), "--out", out], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    keys = fs.find("results-bucket/runs/tiny")
    votes = [k for k in keys if "/votes/" in k]
    assert len(votes) == 3 * 2  # shards x methods
    assert not [k for k in keys if ".tmp-" in k]  # nothing half-written, no temporaries
    for name in ("config.yaml", "manifest.parquet", "run.json", "report.md", "tables/certificates.parquet",
                 "tables/accuracy.parquet"):
        assert f"results-bucket/runs/tiny/{name}" in keys, name
    stored = yaml.safe_load(fs.cat("results-bucket/runs/tiny/config.yaml"))
    assert stored["out"] == out and "secret" not in json.dumps(stored).lower()

    again = runner.invoke(app, ["certify", "--config", str(config), "--out", out], catch_exceptions=False)
    assert "computed 0 shards, 6 already complete" in again.output

    # An unreadable object under a shard's key is detected and only that shard is recomputed.
    fs.pipe_file(votes[0], b"garbage, not parquet")
    healed = runner.invoke(app, ["certify", "--config", str(config), "--out", out], catch_exceptions=False)
    assert "computed 1 shards, 5 already complete" in healed.output

    q = runner.invoke(app, ["sql", out, "SELECT method, count(*) AS images FROM certificates GROUP BY 1 ORDER BY 1",
                            "--format", "json"], catch_exceptions=False)
    assert json.loads(q.output) == [{"method": "dds", "images": 6}, {"method": "rs", "images": 6}]
