"""The densepure CLI end to end on tiny models: certify, resume, refusal, sql, report, export-tsv."""

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml
from model_factory import tiny_job
from netcheck import LOOPBACK, descendants, listening_addresses
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def certified(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp)))
    result = invoke("certify", "--config", config)
    assert result.exit_code == 0, result.output
    return tmp, config, result


def test_help_lists_every_command():
    result = invoke("--help")
    for cmd in ("certify", "sql", "report", "export-tsv", "train-toy", "config"):
        assert cmd in result.output
    for cmd in ("certify", "sql", "report", "export-tsv", "train-toy"):
        assert invoke(cmd, "--help").exit_code == 0


def test_certify_writes_the_contract_and_prints_the_table(certified):
    tmp, config, result = certified
    out = tmp / "out"
    for name in ("config.yaml", "manifest.parquet", "run.json", "report.md", "certified_accuracy.png",
                 "tables/certificates.parquet", "tables/accuracy.parquet"):
        assert (out / name).exists(), name
    assert len(list((out / "votes").rglob("*.parquet"))) == 3 * 2 * 3
    certs = pq.read_table(out / "tables" / "certificates.parquet")
    assert certs.num_rows == 6 * 2 * 3 and set(certs.column("method").to_pylist()) == {"rs", "dds", "densepure-k3-s2"}
    assert "densepure-k3-s2" in result.output and "stages: plan" in result.output


def test_rerun_computes_nothing(certified):
    tmp, config, _ = certified
    votes = sorted((tmp / "out" / "votes").rglob("*.parquet"))
    mtimes = [os.path.getmtime(p) for p in votes]
    result = invoke("certify", "--config", config)
    assert result.exit_code == 0, result.output
    assert "computed 0 shards, 18 already complete" in result.output
    assert mtimes == [os.path.getmtime(p) for p in votes]


def test_different_config_on_same_out_is_refused(certified):
    tmp, config, _ = certified
    result = runner.invoke(app, ["certify", "--config", str(config), "--set", "n=13"])
    assert result.exit_code == 1
    assert "different config" in result.output and "fields that differ: n" in result.output


def test_invalid_override_names_the_field(certified):
    tmp, config, _ = certified
    result = runner.invoke(app, ["certify", "--config", str(config), "--set", "alpha=2"])
    assert result.exit_code == 2 and "alpha" in result.output


def test_sql_report_and_tsv(certified):
    tmp, config, _ = certified
    out = tmp / "out"
    result = invoke("sql", out, "SELECT count(*) AS n FROM certificates", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.output)[0]["n"] == 36
    result = invoke("sql", out, "SELECT round(cp_lower(10, 10, 0.001), 6) AS b", "--format", "csv")
    assert result.output.strip().splitlines()[-1] == "0.501187"
    assert invoke("report", out).exit_code == 0
    result = invoke("export-tsv", out)
    files = result.output.split()
    assert len(files) == 6
    assert open(files[0]).readline().rstrip("\n").split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]


def test_services_started_by_a_run_listen_on_loopback(certified):
    """After a flow run, Prefect's temporary server (a child process) is still up: loopback only."""
    sockets = listening_addresses(descendants(os.getpid()))
    assert all(addr in LOOPBACK for addr, _ in sockets), sockets


def test_train_toy_quick_writes_verifiable_models(tmp_path):
    from densepure_core.models.toy import verify_assets

    result = invoke("train-toy", "--quick", "--out", tmp_path / "toy")
    assert result.exit_code == 0, result.output
    verify_assets(tmp_path / "toy")  # every weights file matches the manifest's sha256
    assert (tmp_path / "toy" / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_config_show_reads_the_packaged_presets(tmp_path, monkeypatch):
    from densepure_core.config import PACKAGED_CONFIGS

    monkeypatch.chdir(tmp_path)  # no source tree around: the presets come from the package
    default = invoke("config", "show")
    assert default.exit_code == 0 and "bundled:digits/ddpm" in default.output
    assert "stream_version" not in default.output.split("# config_hash")[0]  # not a config field
    by_name = invoke("config", "show", "--config", "imagenet_dds")
    assert by_name.exit_code == 0, by_name.output
    legacy = invoke("config", "show", "--config", "configs/imagenet_dds.yaml")  # the old source-tree path
    assert legacy.output == by_name.output
    missing = runner.invoke(app, ["config", "show", "--config", "no_such_preset"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert str(PACKAGED_CONFIGS).endswith("densepure_core/config/presets")
