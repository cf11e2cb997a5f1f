"""The pipeline on S3 (a real moto S3 server on 127.0.0.1): models and images read from s3://, votes,
tables and checkpoints written there, resume from there, sql on s3://."""

import hashlib
import json
from pathlib import Path

import pytest
import s3fs
import yaml
from model_factory import tiny_job
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.servers

runner = CliRunner()


def test_certify_and_query_on_s3(tmp_path, s3_endpoint, monkeypatch):
    """Everything on S3: the diffusion model and the images are read from s3://, votes and tables
    written there, a rerun resumes from there, and `densepure sql s3://...` queries it."""
    from densepure_core.models import file_sha256

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("results-bucket")
    fs.mkdir("models-bucket")
    out = "s3://results-bucket/runs/tiny"
    job = tiny_job(tmp_path, sigmas=[0.5], methods=[{"kind": "rs"}, {"kind": "dds"}])
    fs.put(job["diffusion"]["source"], "models-bucket/ddpm", recursive=True)
    fs.put(job["dataset"]["path"], "models-bucket/data", recursive=True)
    job.update(diffusion={"source": "s3://models-bucket/ddpm"},
               dataset=dict(job["dataset"], path="s3://models-bucket/data"))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))

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
    # The workers purified with their copy of the uploaded model: the weights in the cache that
    # load_diffusion keeps for this URI (~/.cache/densepure/s3/<sha256(uri)[:16]>; not HOME in a
    # temp dir: Ray's token file lives under HOME too) are the local model's.
    uri = job["diffusion"]["source"]
    cached = Path("~/.cache/densepure/s3").expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = tmp_path / "models" / "ddpm"
    weights = sorted(p.relative_to(local) for p in local.rglob("*.safetensors"))
    assert weights and all(file_sha256(cached / w) == file_sha256(local / w) for w in weights)

    again = runner.invoke(app, ["certify", "--config", str(config), "--out", out], catch_exceptions=False)
    assert "computed 0 shards, 6 already complete" in again.output

    # An unreadable object under a shard's key is detected and only that shard is recomputed.
    fs.pipe_file(votes[0], b"garbage, not parquet")
    healed = runner.invoke(app, ["certify", "--config", str(config), "--out", out], catch_exceptions=False)
    assert "computed 1 shards, 5 already complete" in healed.output

    q = runner.invoke(app, ["sql", out, "SELECT method, count(*) AS images FROM certificates GROUP BY 1 ORDER BY 1",
                            "--format", "json"], catch_exceptions=False)
    assert json.loads(q.output) == [{"method": "dds", "images": 6}, {"method": "rs", "images": 6}]
    # the lease is given back: nothing but results stays under OUT
    assert "results-bucket/runs/tiny/lease.json" not in fs.find("results-bucket/runs/tiny")

    # A store on S3 (issue 27): a second run under the same prefix, then SQL across both runs,
    # a comparison of the two and the store's history page, all read from s3://.
    other = "s3://results-bucket/runs/tiny-seed-5"
    second = runner.invoke(app, ["certify", "--config", str(config), "--out", other, "--set", "seed=5"],
                           catch_exceptions=False)
    assert second.exit_code == 0, second.output
    store = "s3://results-bucket/runs"
    runs = runner.invoke(app, ["sql", store, "SELECT out, status FROM runs ORDER BY out", "--format", "json"])
    assert json.loads(runs.output) == [{"out": out, "status": "complete"}, {"out": other, "status": "complete"}]
    compared = runner.invoke(app, ["compare", out, other, "--format", "json"])
    assert compared.exit_code == 0, compared.output
    assert {(r["method"], r["images"]) for r in json.loads(compared.output)} == {("dds", 6), ("rs", 6)}
    history = runner.invoke(app, ["report", store])
    assert history.exit_code == 0, history.output
    assert "2 run(s): 2 complete" in fs.cat("results-bucket/runs/history.md").decode()


# slow (make test-slow, ~1 min): S3's storage layer is the one certify's S3 test above covers; this adds
# Ray Train's checkpoints on S3, kept out of the default run for its 20-minute limit.
@pytest.mark.slow
def test_train_addt_checkpoints_metrics_and_model_on_s3(tmp_path, s3_endpoint, monkeypatch):
    """Ray Train persists its checkpoints to OUT on S3 (through s3fs), the metrics and the model
    land there too, a rerun with more steps resumes from the S3 checkpoint, and the model loads
    from s3:// as a diffusion source."""
    from model_factory import addt_job

    from densepure_core.models import load_diffusion

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("addt-bucket")
    out = "s3://addt-bucket/runs/addt"
    config = tmp_path / "addt.yaml"
    config.write_text(yaml.safe_dump(addt_job(tmp_path, steps=2, workers=1, checkpoint_every=1)))
    result = runner.invoke(app, ["train-addt", "--config", str(config), "--out", out], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    more = runner.invoke(app, ["train-addt", "--config", str(config), "--out", out, "--set", "steps=3"],
                         catch_exceptions=False)
    assert more.exit_code == 0, more.output
    keys = fs.find("addt-bucket/runs/addt")
    assert "addt-bucket/runs/addt/train/step-000003/training_state.pt" in keys
    assert sorted(k.rsplit("/", 1)[1] for k in keys if "/metrics/" in k) == [
        "steps=000001-000001.parquet", "steps=000002-000002.parquet", "steps=000003-000003.parquet"]
    sql = runner.invoke(app, ["sql", out, "SELECT count(*) FROM train_metrics", "--format", "csv"])
    assert sql.output.splitlines()[1] == "3", sql.output
    model = load_diffusion(f"{out}/model", cache_dir=tmp_path / "cache")
    assert model.unet.config.sample_size == 8
