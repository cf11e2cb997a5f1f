"""tasks/train_addt/train.py without Ray: the metrics files of lost steps, the latest checkpoint."""

import json


from tasks.common.layout import TRAIN_METRICS_SCHEMA
from tasks.common.run_dir import RunDir
from tasks.train_addt.train import _drop_metrics_after, latest_checkpoint


def test_a_resume_drops_the_metrics_of_steps_after_its_checkpoint(tmp_path):
    run = RunDir(str(tmp_path))
    for first, last in ((1, 2), (3, 4), (5, 5)):
        run.write_parquet(run.metrics_uri(first, last), TRAIN_METRICS_SCHEMA.empty_table())
    _drop_metrics_after(run, 4)
    assert [f.rsplit("/", 1)[1] for f in run.metrics_files()] == ["steps=000001-000002.parquet",
                                                                  "steps=000003-000004.parquet"]
    _drop_metrics_after(run, 2)
    assert [f.rsplit("/", 1)[1] for f in run.metrics_files()] == ["steps=000001-000002.parquet"]


def test_the_latest_checkpoint_is_the_one_ray_trains_snapshot_names(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "step-000009").mkdir()  # a folder Ray never listed (an interrupted upload)
    (tmp_path / "train" / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "step-000004"}, {"checkpoint_dir_name": "step-000006"}],
         "latest_checkpoint_result": {"checkpoint_dir_name": "step-000006"}}))
    assert latest_checkpoint(str(tmp_path)) == "step-000006"
