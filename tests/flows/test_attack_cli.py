"""`densepure attack` through the real CLI: a run, the SQL views and report, and a SIGKILL of the
whole run mid-way whose rerun gives exactly the rows of an undisturbed run, none twice."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from model_factory import attack_job
from typer.testing import CliRunner

from flows.cli import app
from tasks.common.layout import ATTACKS_SCHEMA

DENSEPURE = str(Path(sys.executable).parent / "densepure")
# wall-clock facts and the run's id; every other column is a result
VOLATILE = {"created_at", "seconds", "worker", "run_id"}


def rows(out):
    table = pq.read_table(Path(out) / "attacks", partitioning=None, schema=ATTACKS_SCHEMA)
    keep = [c for c in table.column_names if c not in VOLATILE]
    return sorted(tuple(str(v) for v in r.values()) for r in table.select(keep).to_pylist())


def write_config(tmp, name):
    data = attack_job(tmp, shard_size=2, out=str(tmp / name))  # the same models, data and config hash
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def test_attack_cli_end_to_end_then_killed_run_reruns_to_the_same_rows(tmp_path):
    runner = CliRunner()
    config, data = write_config(tmp_path, "ref")
    result = runner.invoke(app, ["attack", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "robust majority" in result.output and "| none | linf-8 | pgd_eot | 6 |" in result.output
    reference = rows(data["out"])
    assert len(reference) == 6 * 4

    summary = runner.invoke(app, ["sql", data["out"], "SELECT defense, attack, rule, images FROM attack_summary "
                                                      "WHERE rule = 'worst' ORDER BY ALL", "--format", "csv"])
    assert summary.exit_code == 0, summary.output
    assert summary.output.splitlines()[1:] == ["none,pgd_eot,worst,6", "purify-t0.1-s2-k2,bpda,worst,6",
                                               "purify-t0.1-s2-k2,dwbox,worst,6", "purify-t0.1-s2-k2,pgd_eot,worst,6"]
    report = runner.invoke(app, ["report", data["out"]])
    assert report.exit_code == 0 and "# Attack evaluation report" in report.output
    shown = runner.invoke(app, ["config", "show", "--config", str(config)])
    assert shown.exit_code == 0 and "job: attack" in shown.output

    # The same config in a new OUT, killed (SIGKILL of the driver, Ray and its actors) after the
    # third shard was attacked in memory, then rerun.
    config2, data2 = write_config(tmp_path, "crash")
    data2_out = data2["out"]
    env = dict(os.environ, DENSEPURE_FAULT="attack:mid-shard@3", DENSEPURE_FAULT_ONCE=str(tmp_path / "fault.once"),
               PREFECT_LOGGING_LEVEL="ERROR")
    env.pop("DENSEPURE_FAULT_PGID", None)
    crashed = subprocess.run([DENSEPURE, "attack", "--config", str(config2)], env=env, start_new_session=True,
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    written = {p: p.stat().st_mtime for p in Path(data2_out, "attacks").rglob("*.parquet")}
    assert 0 < len(written) < 12  # killed mid-way: some shards done, not all
    rerun = subprocess.run([DENSEPURE, "attack", "--config", str(config2)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(written)} already complete" in rerun.stderr
    assert {p: p.stat().st_mtime for p in written} == written  # complete shards were not recomputed
    assert rows(data2_out) == reference  # the same rows as the undisturbed run, none twice, none missing
    print(f"\nkilled after {len(written)} of 12 shards; rerun identical ({len(reference)} rows)")
