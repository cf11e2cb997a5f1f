"""A recomputed shard replaces its old errors (quarantine) file: fixed images are certified,
counted as expected, and no longer reported."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
from model_factory import tiny_job
from PIL import Image

from densepure_core.config import load_config
from tasks.certify.aggregate import aggregate
from tasks.common.quarantine import quarantined_counts, read_errors
from tasks.common.run_dir import RunDir
from tasks.certify.plan import plan_run
from tasks.certify.report import write_report
from tasks.certify.vote import VoteWorker, run_vote_stage


def run_all(cfg):
    """The flow's vote and aggregate stages, in-process (same expected-image arithmetic)."""
    plan = plan_run(cfg)
    worker = VoteWorker(cfg, plan.num_classes, "test-worker")
    results = [worker.run_shard(t) for t in plan.tasks()]
    quarantined = quarantined_counts(RunDir(cfg.out))
    expected = {p: n - quarantined.get(p, 0) for p, n in plan.expected_images().items()}
    return plan, results, aggregate(cfg.out, alpha=cfg.alpha, expected=expected)


def test_recomputed_shard_replaces_its_old_errors_file(tmp_path):
    data = tiny_job(tmp_path, sigmas=[0.5], methods=[{"kind": "rs"}], shard_size=3,
                    on_bad_input="quarantine")
    bad = tmp_path / "data" / "b" / "corrupt.png"
    bad.write_bytes(b"\x89PNG not really")
    cfg = load_config(data=data)
    plan, results, result = run_all(cfg)
    (task,) = [t for t in plan.tasks() if "b/corrupt.png" in [r.image_id for r in t.records]]
    assert os.path.exists(task.errors_uri) and sum(r.quarantined for r in results) == 1
    assert result.images == 6
    assert "b/corrupt.png" in write_report(cfg.out)

    # The image is fixed and its shard re-voted (its votes file removed): the old quarantine
    # record must go, or the expected count (planned - quarantined) undercounts.
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(bad, format="PNG")
    stale = tmp_path / "stale-errors.parquet"
    shutil.copy(task.errors_uri, stale)
    os.remove(task.uri)
    plan, results, result = run_all(cfg)
    recomputed = [r for r in results if not r.skipped]
    assert [(r.shard, r.images, r.quarantined) for r in recomputed] == [(task.shard, 1, 0)]
    assert not os.path.exists(task.errors_uri)
    assert quarantined_counts(RunDir(cfg.out)) == {} and read_errors(RunDir(cfg.out)).num_rows == 0
    assert result.images == 7 and result.missing == 0  # accepted: 7 of 7 expected
    assert "b/corrupt.png" in pq.read_table(result.certificates_uri).column("image_id").to_pylist()
    report = write_report(cfg.out)
    assert "image(s) quarantined" not in report and "b/corrupt.png" not in report
    assert "| 0.5 | rs | 7 | 7 | 0 | 0 |" in report  # images, expected, missing, quarantined

    # An OUT written before this fix: a complete shard next to its stale errors file. The vote
    # stage drops the stale file without recomputing anything (no worker, no Ray started).
    shutil.copy(stale, task.errors_uri)
    again = run_vote_stage(cfg, plan)
    assert all(r.skipped for r in again)
    assert not os.path.exists(task.errors_uri)
    # ... and so does a worker asked to run the complete shard (a Ray task retry).
    shutil.copy(stale, task.errors_uri)
    assert VoteWorker(cfg, plan.num_classes).run_shard(task).skipped
    assert not os.path.exists(task.errors_uri)


def test_recomputation_with_the_image_still_bad_keeps_one_record(tmp_path):
    data = tiny_job(tmp_path, sigmas=[0.5], methods=[{"kind": "rs"}], shard_size=3,
                    on_bad_input="quarantine")
    (tmp_path / "data" / "b" / "corrupt.png").write_bytes(b"\x89PNG not really")
    cfg = load_config(data=data)
    plan, _, _ = run_all(cfg)
    (task,) = [t for t in plan.tasks() if "b/corrupt.png" in [r.image_id for r in t.records]]
    os.remove(task.uri)
    _, results, result = run_all(cfg)
    assert [r.quarantined for r in results if not r.skipped] == [1]
    assert read_errors(RunDir(cfg.out)).column("image_id").to_pylist() == ["b/corrupt.png"]
    assert result.images == 6 and result.missing == 0
