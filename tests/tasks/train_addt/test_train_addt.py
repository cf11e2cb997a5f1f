"""tasks/train_addt/train.py without Ray: the metrics files of lost steps, the latest checkpoint."""

import json


from tasks.common import storage
from tasks.common.layout import TRAIN_METRICS_SCHEMA, metrics_files, metrics_uri
from tasks.train_addt.train import _drop_metrics_after, latest_checkpoint


def test_a_resume_drops_the_metrics_of_steps_after_its_checkpoint(tmp_path):
    out = str(tmp_path)
    for first, last in ((1, 2), (3, 4), (5, 5)):
        storage.write_parquet_atomic(metrics_uri(out, first, last), TRAIN_METRICS_SCHEMA.empty_table())
    _drop_metrics_after(out, 4)
    assert [f.rsplit("/", 1)[1] for f in metrics_files(out)] == ["steps=000001-000002.parquet",
                                                                 "steps=000003-000004.parquet"]
    _drop_metrics_after(out, 2)
    assert [f.rsplit("/", 1)[1] for f in metrics_files(out)] == ["steps=000001-000002.parquet"]


def test_the_latest_checkpoint_is_the_one_ray_trains_snapshot_names(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "step-000009").mkdir()  # a folder Ray never listed (an interrupted upload)
    (tmp_path / "train" / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "step-000004"}, {"checkpoint_dir_name": "step-000006"}],
         "latest_checkpoint_result": {"checkpoint_dir_name": "step-000006"}}))
    assert latest_checkpoint(str(tmp_path)) == "step-000006"
