"""`densepure train-addt` refuses bad input before any worker starts: one ``error:`` line naming
the input and the fix, a non-zero exit, and a finished OUT left as it was."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from cli_checks import one_error_line, snapshot
from model_factory import addt_job
from typer.testing import CliRunner

from densepure_core.config.addt import AddtConfig
from flows.cli import app
from tasks.train_addt.train import plan_training

runner = CliRunner()


def _write(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_unlabelled_training_images_are_refused_at_plan_time(tmp_path):
    data = addt_job(tmp_path)
    images = sorted((tmp_path / "data").rglob("*.png"))
    pq.write_table(pa.table({"image_id": [p.stem + p.parent.name for p in images], "uri": [str(p) for p in images],
                             "label": [-1] + [0] * (len(images) - 1)}), tmp_path / "train.parquet")
    data["dataset"] = {"kind": "manifest", "path": str(tmp_path / "train.parquet"), "image_size": 8}
    result = runner.invoke(app, ["train-addt", "--config", str(_write(tmp_path, data))])
    assert result.exit_code == 1
    message = one_error_line(result)
    assert "has no label (-1)" in message and "CGPO" in message and "Label them" in message


def _trained_out(tmp_path, data):
    """An OUT with this run's plan and, as after a first checkpoint, Ray Train's snapshot naming it."""
    plan_training(AddtConfig.model_validate(data))
    (tmp_path / "out" / "train").mkdir()
    (tmp_path / "out" / "train" / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "step-000002"}}))


def test_a_different_config_on_a_trained_out_is_refused_and_the_out_kept(tmp_path):
    data = addt_job(tmp_path)
    _trained_out(tmp_path, data)
    before = snapshot(tmp_path / "out")
    changed = dict(data, lr=1e-3)
    result = runner.invoke(app, ["train-addt", "--config", str(_write(tmp_path, changed))])
    assert result.exit_code == 1
    message = one_error_line(result)
    assert "different config" in message and "lr" in message and "choose another --out" in message
    assert snapshot(tmp_path / "out") == before


def test_an_out_trained_with_the_old_cgpo_draws_is_not_resumed(tmp_path):
    """Before issue 24 CGPO reused one noise draw for its 5 iterations (run.json had no
    draws_version): the same config now trains on other draws, so its checkpoints are not continued."""
    data = addt_job(tmp_path)
    _trained_out(tmp_path, data)
    run_json = tmp_path / "out" / "run.json"
    assert json.loads(run_json.read_text())["draws_version"] == 2
    assert plan_training(AddtConfig.model_validate(data)).resumed  # the current version resumes
    run = json.loads(run_json.read_text())
    del run["draws_version"]
    run_json.write_text(json.dumps(run))
    before = snapshot(tmp_path / "out")
    result = runner.invoke(app, ["train-addt", "--config", str(_write(tmp_path, data))])
    assert result.exit_code == 1
    message = one_error_line(result)
    assert "draws version 1" in message and "draws_version" in message and "new --out" in message
    assert snapshot(tmp_path / "out") == before


def test_an_attack_out_is_not_a_training_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("job: attack\n")
    result = runner.invoke(app, ["train-addt", "--config", str(_write(tmp_path, addt_job(tmp_path)))])
    assert result.exit_code == 1
    assert "needs its own OUT" in (message := one_error_line(result)) and "holds an attack evaluation" in message
    assert (out / "config.yaml").read_text() == "job: attack\n"


def test_an_out_whose_run_never_checkpointed_takes_a_corrected_config(tmp_path):
    """A failed start (plan written, nothing trained) does not lock the OUT: the fixed config re-plans."""
    data = addt_job(tmp_path)
    plan_training(AddtConfig.model_validate(data))
    fixed = AddtConfig.model_validate(dict(data, lr=1e-3))
    plan = plan_training(fixed)
    assert plan.config_hash == fixed.config_hash() and not plan.resumed
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["lr"] == 1e-3


def test_a_wrong_model_or_image_size_is_refused_before_anything_is_written(tmp_path):
    missing = dict(addt_job(tmp_path), diffusion={"source": str(tmp_path / "no-such-model")})
    result = runner.invoke(app, ["train-addt", "--config", str(_write(tmp_path, missing))])
    assert result.exit_code == 1
    assert "no-such-model" in one_error_line(result)
    assert not (tmp_path / "out").exists()
    wrong_size = addt_job(tmp_path)
    wrong_size["dataset"] = dict(wrong_size["dataset"], image_size=12)
    result = runner.invoke(app, ["train-addt", "--config", str(_write(tmp_path, wrong_size, "size.yaml"))])
    assert result.exit_code == 1
    assert "takes 8x8" in (message := one_error_line(result)) and "dataset.image_size" in message
    assert not (tmp_path / "out").exists()


def test_a_relative_out_is_made_absolute_for_the_ray_train_workers(tmp_path, monkeypatch):
    """Ray Train runs each worker in its own directory: a relative OUT would put the metrics there."""
    monkeypatch.chdir(tmp_path)
    plan = plan_training(AddtConfig.model_validate(addt_job(tmp_path, out="rel/out")))
    assert plan.run.root == str(tmp_path / "rel" / "out") and (tmp_path / "rel" / "out" / "config.yaml").exists()
