"""`densepure train-addt` through the real CLI on two Ray Train CPU workers (DDP over gloo): a run,
its model, metrics, report and SQL view; a SIGKILL of the whole run (driver, Ray, workers) after
a checkpoint, whose rerun resumes and ends with exactly the weights of the undisturbed run; and
(slow) one worker killed mid-run, which Ray Train restarts from the checkpoint inside the same run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from model_factory import addt_job
from typer.testing import CliRunner

from densepure_core.models import load_diffusion
from flows.cli import app
from tasks.train_addt.train import STATE_FILE

DENSEPURE = str(Path(sys.executable).parent / "densepure")


def write_config(tmp, name, **over):
    data = addt_job(tmp, out=str(tmp / name), **over)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def final_state(out):
    return torch.load(Path(out) / "train" / "step-000006" / STATE_FILE, weights_only=True)


def assert_same_state(a, b):
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])


def metrics(out):
    table = pq.read_table(Path(out) / "metrics").sort_by("step")
    return table.column("step").to_pylist(), table.column("loss").to_pylist()


def run_cli(config, env_over=None):
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="ERROR", **(env_over or {}))
    env.pop("DENSEPURE_FAULT_PGID", None)
    return subprocess.run([DENSEPURE, "train-addt", "--config", str(config)], env=env, start_new_session=True,
                          capture_output=True, text=True, timeout=600)


def test_train_addt_cli_end_to_end_then_killed_run_resumes_to_the_same_weights(tmp_path):
    runner = CliRunner()
    config, data = write_config(tmp_path, "ref")
    result = runner.invoke(app, ["train-addt", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "# ADDT fine-tuning" in result.output and "final checkpoint: `step-000006`" in result.output
    out = Path(data["out"])
    model = load_diffusion(str(out / "model"))  # a diffusion source for certify and attack
    assert model.unet.config.dropout == 0.1 and model.scheduler.config.num_train_timesteps == 1000
    steps, reference_loss = metrics(out)
    assert steps == [1, 2, 3, 4, 5, 6]
    sql = runner.invoke(app, ["sql", str(out), "SELECT count(*), min(workers), max(step) FROM train_metrics",
                              "--format", "csv"])
    assert sql.exit_code == 0 and sql.output.splitlines()[1] == "6,2,6", sql.output
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0 and "| 1-1 |" in report.output and "| 6-6 |" in report.output
    shown = runner.invoke(app, ["config", "show", "--config", str(config)])
    assert shown.exit_code == 0 and "job: train-addt" in shown.output
    # the EMA weights in OUT/model are the final checkpoint's
    ema = final_state(out)["ema"]["shadow_params"]
    assert all(torch.equal(p, e) for p, e in zip(model.unet.parameters(), ema))
    reference = final_state(out)

    # The same config in a new OUT, SIGKILLed (driver, local Ray, both workers) when a worker
    # finishes its third step: the checkpoint after step 2 exists, step 4's does not.
    config2, data2 = write_config(tmp_path, "crash")
    crashed = run_cli(config2, {"DENSEPURE_FAULT": "train:after-step@3",
                                "DENSEPURE_FAULT_ONCE": str(tmp_path / "fault.once")})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    out2 = Path(data2["out"])
    assert (out2 / "train" / "step-000002").is_dir() and not (out2 / "train" / "step-000004").exists()
    assert not (out2 / "model").exists()
    rerun = run_cli(config2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "step 6/6" in rerun.stderr
    # progress and results only: no Ray token-authentication notice, no diffusers dtype chatter
    assert "Token authentication" not in rerun.stderr and "kept in float32" not in rerun.stderr
    assert_same_state(final_state(out2), reference)
    assert metrics(out2) == (steps, reference_loss)  # every step once, the same losses
    print(f"\nthe killed run resumed to the reference weights (losses {reference_loss})")


@pytest.mark.slow  # make test-slow: a reference run and a run with a killed worker (~1.5 min)
def test_a_killed_worker_is_restarted_from_the_checkpoint_to_the_same_weights(tmp_path):
    """One worker process killed mid-run (not the driver): Ray Train restarts the worker group
    from the checkpoint after step 2 (max_failures), and the run ends normally, with the weights
    of an undisturbed run."""
    config, data = write_config(tmp_path, "ref")
    assert run_cli(config).returncode == 0
    reference = final_state(data["out"])
    config3, data3 = write_config(tmp_path, "worker")
    survived = run_cli(config3, {"DENSEPURE_FAULT": "train:after-step@3", "DENSEPURE_FAULT_SIGNAL": "self",
                                 "DENSEPURE_FAULT_ONCE": str(tmp_path / "worker.once")})
    assert survived.returncode == 0, survived.stderr[-3000:]
    assert (tmp_path / "worker.once").exists()  # the fault did fire
    assert_same_state(final_state(data3["out"]), reference)
