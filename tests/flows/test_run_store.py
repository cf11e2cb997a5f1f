"""Issue 27 through the CLI: a store of runs answers SQL across runs, two runs are compared image by
image, a store gets a history page, and deployment runs land in the store (each compared with the
last). The S3 store is in tests/flows/test_s3.py."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from model_factory import image_folder, tiny_job
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _job(tmp: Path, name: str, **over) -> str:
    data = tiny_job(tmp, methods=[{"kind": "rs"}], sigmas=[0.5], shard_size=3, run_name=name, **over)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _certify(config: str, out: Path) -> None:
    result = runner.invoke(app, ["certify", "--config", config, "--out", str(out)])
    assert result.exit_code == 0, result.output


def _rows(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_store_answers_sql_across_runs_compares_two_and_writes_its_history(tmp_path):
    store = tmp_path / "store"
    a, b = store / "20261201T030000Z-a", store / "20261202T030000Z-b"
    _certify(_job(tmp_path, "a"), a)
    _certify(_job(tmp_path, "b", seed=11), b)
    # a failed run: an image that cannot be read stops it after its plan
    bad = image_folder(tmp_path / "bad-data")
    (bad / "a" / "0.png").write_bytes(b"not an image")
    failed = runner.invoke(app, ["certify", "--config", _job(tmp_path, "c", dataset={
        "kind": "imagefolder", "path": str(bad), "image_size": 8}), "--out", str(store / "20261203T030000Z-c")])
    assert failed.exit_code == 1
    # a partial run: stopped with one shard voted (what a killed run leaves)
    partial = store / "20261204T030000Z-d"
    shutil.copytree(b, partial)
    shutil.rmtree(partial / "tables")
    (partial / "votes" / "sigma=0.5" / "method=rs" / "shard=00001.parquet").unlink()
    run = json.loads((partial / "run.json").read_text())
    run.update(run_id="d-interrupted", status="running")
    (partial / "run.json").write_text(json.dumps(run))

    runs = _rows(runner.invoke(app, ["sql", str(store), "SELECT run_name, job, status, images, error FROM runs "
                                                        "ORDER BY out", "--format", "json"]))
    assert [(r["run_name"], r["status"]) for r in runs] == [("a", "complete"), ("b", "complete"),
                                                            ("c", "failed"), ("b", "partial")]
    assert all(r["job"] == "certify" and r["images"] == 6 for r in runs)
    assert "cannot be decoded" in runs[2]["error"]

    # every view spans the runs and names them: certified accuracy at r = 0.5 for each run
    acc = _rows(runner.invoke(app, ["sql", str(store), "SELECT r.run_name, a.certified_accuracy FROM accuracy a "
                                    "JOIN runs r USING (run_id) WHERE a.radius = 0.5 ORDER BY r.out",
                                    "--format", "json"]))
    assert [r["run_name"] for r in acc] == ["a", "b"]
    two = _rows(runner.invoke(app, ["sql", str(a), str(b), "SELECT count(DISTINCT run_id) AS runs, count(*) AS "
                                    "images FROM certificates", "--format", "json"]))
    assert two == [{"runs": 2, "images": 12}]

    # compare: differing fields first, then per radius B - A with its interval and McNemar's p
    shown = runner.invoke(app, ["compare", str(a), str(b)])
    assert shown.exit_code == 0, shown.output
    assert "config fields that differ: `seed`" in shown.output and "6 image-partitions in both" in shown.output
    rows = _rows(runner.invoke(app, ["compare", str(a), str(b), "--format", "json", "--report",
                                     str(tmp_path / "cmp")]))
    assert {r["radius"] for r in rows} >= {0.0, 0.5} and all(r["images"] == 6 for r in rows)
    for r in rows:
        assert r["difference"] == pytest.approx(r["accuracy_b"] - r["accuracy_a"])
        assert r["difference_low"] <= r["difference"] <= r["difference_high"] and 0 <= r["p_value"] <= 1
    assert (tmp_path / "cmp" / "comparison.md").exists() and (tmp_path / "cmp" / "comparison.png").exists()
    refused = runner.invoke(app, ["compare", str(a), str(store)])
    assert refused.exit_code == 1 and "compare takes one OUT on each side" in refused.output

    history = runner.invoke(app, ["report", str(store), "--radii", "0,0.5"])
    assert history.exit_code == 0, history.output
    page = (store / "history.md").read_text()
    assert "4 run(s): 2 complete, 1 partial, 1 failed." in page and "rs s=0.5 r=0.5" in page
    assert (store / "history.png").stat().st_size > 1000


def test_deployment_runs_land_in_the_store_and_each_is_compared_with_the_last(tmp_path):
    from flows.certify import certify_config_file
    from tasks.common.store import store_runs

    store = tmp_path / "nightly"
    config = _job(tmp_path, "nightly")
    first = certify_config_file(config_path=config, store=str(store))
    second = certify_config_file(config_path=config, store=str(store))
    runs = store_runs(str(store), "certify")
    assert len(runs) == 2 and first["out"] != second["out"]
    assert all(r.status == "complete" for r in runs)
    names = sorted(Path(r.run.root).name for r in runs)
    assert names == [Path(first["out"]).name, Path(second["out"]).name]  # they sort by start time
    comparison = Path(second["out"]) / "comparison" / "comparison.md"
    assert comparison.exists() and first["run_id"] in comparison.read_text()
    assert not (Path(first["out"]) / "comparison" / "comparison.md").exists()  # nothing before it

    # an unfinished latest run of the same config is continued, not started again
    meta = json.loads((Path(second["out"]) / "run.json").read_text())
    meta["status"] = "running"
    (Path(second["out"]) / "run.json").write_text(json.dumps(meta))
    (Path(second["out"]) / "votes" / "sigma=0.5" / "method=rs" / "shard=00000.parquet").unlink()
    third = certify_config_file(config_path=config, store=str(store))
    assert third["out"] == second["out"] and third["computed_shards"] == 1
    assert len(store_runs(str(store))) == 2
    assert pq.read_table(Path(third["out"]) / "tables" / "certificates.parquet").num_rows == 6
