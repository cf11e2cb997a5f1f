"""tasks/common/run_dir.py: one handle per OUT, the layout's paths, metadata, pickling."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from tasks.common.layout import LayoutError
from tasks.common.run_dir import RunDir


def test_paths_follow_the_documented_layout(tmp_path):
    run = RunDir(str(tmp_path))
    root = str(tmp_path)
    assert run.shard_uri(0.25, "dds", 3) == f"{root}/votes/sigma=0.25/method=dds/shard=00003.parquet"
    assert run.errors_uri(1, "rs", 12) == f"{root}/errors/sigma=1.0/method=rs/shard=00012.parquet"
    assert (run.attack_shard_uri("purify", "linf-8", "pgd", 0)
            == f"{root}/attacks/defense=purify/threat=linf-8/attack=pgd/shard=00000.parquet")
    assert (run.attack_errors_uri("none", "l2-0.5", "bpda", 1)
            == f"{root}/attack_errors/defense=none/threat=l2-0.5/attack=bpda/shard=00001.parquet")
    assert run.metrics_uri(1, 300) == f"{root}/metrics/steps=000001-000300.parquet"
    assert run.tables_uri("accuracy.parquet") == f"{root}/tables/accuracy.parquet"
    assert (run.config_uri, run.run_uri, run.manifest_uri, run.report_uri, run.plot_uri) == (
        f"{root}/config.yaml", f"{root}/run.json", f"{root}/manifest.parquet", f"{root}/report.md",
        f"{root}/certified_accuracy.png")
    assert (run.train_dir, run.model_dir, run.tsv_dir, run.logs_dir) == (
        f"{root}/train", f"{root}/model", f"{root}/tsv", f"{root}/logs")
    s3 = RunDir("s3://bucket/prefix/run1")
    assert s3.is_s3 and s3.shard_uri(0.5, "rs", 0) == "s3://bucket/prefix/run1/votes/sigma=0.5/method=rs/shard=00000.parquet"


def test_metadata_and_the_job_it_names(tmp_path):
    run = RunDir(str(tmp_path / "out"))
    assert run.read_config() is None and run.read_run() is None and run.job() is None
    run.write_text(run.config_uri, "n: 5\n")
    assert run.job() == "certify"  # a certification config has no job: key
    run.write_text(run.config_uri, "job: attack\n")
    run.write_run({"run_id": "r1"})
    assert run.job() == "attack" and run.read_run() == {"run_id": "r1"}


def test_it_pickles_without_its_file_system_and_reopens_one(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_parquet(run.shard_uri(0.5, "rs", 0), pa.table({"x": [1]}))
    assert "fs" in run.__dict__  # opened once, kept for the run
    copy = pickle.loads(pickle.dumps(run))
    assert copy == run and "fs" not in copy.__dict__ and copy.vote_files() == run.vote_files()
    assert RunDir.of(run) is run and RunDir.of(str(tmp_path)) == run


def test_files_outside_the_vote_layout_are_refused_by_name(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_parquet(run.path("votes", "stray.parquet"), pa.table({"x": [1]}))
    with pytest.raises(LayoutError, match="stray.parquet"):
        run.vote_files()
    with pytest.raises(ValueError, match="empty OUT"):
        RunDir("")
