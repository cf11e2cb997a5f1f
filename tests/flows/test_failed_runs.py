"""Issue 17 through the real CLI: getting out of a failed run, errors caught before any GPU time,
partitions whose every image was quarantined, and which alpha the published tables use."""

import json
import shutil

import yaml
from cli_checks import snapshot
from model_factory import image_folder, tiny_job
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _write(tmp_path, data):
    config = tmp_path / f"{data['run_name']}.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def test_a_partition_whose_every_image_is_quarantined_stays_in_the_report(tmp_path):
    """Item 2: 12x12 images without dataset.image_size: RS resizes them, DDS quarantines them all.
    The DDS partition stays in summary.json and both report tables with 0 images and 6
    quarantined; an OUT with nothing but such partitions reports instead of crashing."""
    data = tiny_job(tmp_path, methods=[{"kind": "rs"}, {"kind": "dds"}], sigmas=[0.5],
                    on_bad_input="quarantine")
    shutil.rmtree(tmp_path / "data")
    image_folder(tmp_path / "data", size=12)
    data["dataset"]["image_size"] = None
    result = runner.invoke(app, ["certify", "--config", str(_write(tmp_path, data))])
    assert result.exit_code == 0, result.output
    assert "6 image(s) quarantined" in result.output
    summary = json.loads((tmp_path / "out" / "tables" / "summary.json").read_text())
    parts = {p["method"]: p for p in summary["partitions"]}
    assert parts["dds"]["images"] == 0 and parts["dds"]["quarantined"] == 6
    assert parts["rs"]["images"] == 6 and parts["rs"]["quarantined"] == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 0.5 | dds | 0 | - | - | - | - | - | - | - |" in report  # the accuracy table
    assert "| 0.5 | dds | 0 | 0 | 0 | 6 | - |" in report  # images, expected, missing, quarantined
    assert "| 0.5 | rs | 6 | 6 | 0 | 0 |" in report

    data.update(run_name="only-dds", methods=[{"kind": "dds"}], out=str(tmp_path / "out-dds"))
    result = runner.invoke(app, ["certify", "--config", str(_write(tmp_path, data))])
    assert result.exit_code == 0, result.output  # was: error: TypeError: 'NoneType' object is not iterable
    assert "| 0.5 | dds | 0 | 0 | 0 | 6 | - |" in result.output and "- alpha: 0.01 " in result.output
    votes = snapshot(tmp_path / "out-dds" / "votes")
    rebuilt = runner.invoke(app, ["report", data["out"]])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "| 0.5 | dds | 0 | 0 | 0 | 6 | - |" in rebuilt.output
    assert snapshot(tmp_path / "out-dds" / "votes") == votes and len(votes) == 3


def test_a_new_alpha_on_the_same_out_is_said_by_config_yaml_run_json_and_the_tables(tmp_path):
    """Item 4: a rerun with another alpha re-aggregates the same votes (nothing voted again);
    config.yaml, run.json and both tables then say the new alpha, and config.yaml still resumes."""
    import pyarrow.parquet as pq

    data = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5])
    config = _write(tmp_path, data)
    out = tmp_path / "out"
    assert runner.invoke(app, ["certify", "--config", str(config)]).exit_code == 0
    votes = snapshot(out / "votes")
    result = runner.invoke(app, ["certify", "--config", str(config), "--set", "alpha=0.05"])
    assert result.exit_code == 0, result.output
    assert "computed 0 shards" in result.output and "- alpha: 0.05 " in result.output
    assert snapshot(out / "votes") == votes
    stored = yaml.safe_load((out / "config.yaml").read_text())
    run = json.loads((out / "run.json").read_text())
    assert stored["alpha"] == 0.05 and run["tables"]["alpha"] == 0.05 and run["tables"]["radii"] == stored["radii"]
    assert set(pq.read_table(out / "tables" / "certificates.parquet").column("alpha").to_pylist()) == {0.05}
    assert json.loads((out / "tables" / "summary.json").read_text())["alpha"] == 0.05
    # the rewritten config.yaml is the same run: it resumes (nothing voted), it is not "a different config"
    again = runner.invoke(app, ["certify", "--config", str(out / "config.yaml")])
    assert again.exit_code == 0 and "computed 0 shards" in again.output, again.output
    assert snapshot(out / "votes") == votes
