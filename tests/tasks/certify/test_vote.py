"""Stage 2: vote files (schema, counts), resume, truncated/foreign shards, determinism, Ray actors."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from model_factory import tiny_job

from densepure_core.config import load_config
from tasks.common.layout import VOTES_SCHEMA
from tasks.certify.plan import partition_key, plan_run
from tasks.certify.vote import VoteWorker, run_vote_stage, shard_is_complete


def run_in_process(data):
    cfg = load_config(data=data)
    plan = plan_run(cfg)
    worker = VoteWorker(cfg, plan.num_classes, "test-worker")
    return cfg, plan, [worker.run_shard(t) for t in plan.tasks()]


def counts_by_key(out):
    table = pq.read_table(os.path.join(out, "votes"), partitioning=None)
    rows = table.select(["sigma", "method", "image_id", "counts0", "counts", "unet_calls"]).to_pylist()
    return {(r["sigma"], r["method"], r["image_id"]): (r["counts0"], r["counts"], r["unet_calls"]) for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    data = tiny_job(tmp)
    cfg, plan, results = run_in_process(data)
    return tmp, data, cfg, plan, results


def test_vote_files_follow_the_schema(reference):
    tmp, data, cfg, plan, results = reference
    assert len(results) == 3 * 2 * 3  # shards x sigmas x methods
    table = pq.read_table(plan.tasks()[0].uri)
    assert table.schema.equals(VOTES_SCHEMA)
    row = table.to_pylist()[0]
    # each partition's rows carry its identity (tasks/certify/plan.py partition_hashes), and the
    # fingerprints of the models that voted them
    assert row["config_hash"] == plan.partition_hashes[partition_key(row["sigma"], row["method"])]
    assert row["run_id"] == plan.run_id and row["classifier_fingerprint"] == plan.fingerprints[cfg.classifier.source]
    assert sum(row["counts0"]) == cfg.n0 and sum(row["counts"]) == cfg.n and len(row["counts"]) == 2
    assert all(r.unet_calls == 0 for r in results if r.method == "rs")
    # DDS: one UNet call per copy; DensePure: at most k * steps per copy, fewer with early exit.
    per_image = cfg.n0 + cfg.n
    dds = [r for r in results if r.method == "dds"][0]
    assert dds.unet_calls == dds.images * per_image
    dp = [r for r in results if r.method == "densepure-k3-s2"][0]
    assert 2 * 2 * dp.images * per_image <= dp.unet_calls <= 3 * 2 * dp.images * per_image


def test_rerun_skips_complete_shards(reference):
    tmp, data, cfg, plan, results = reference
    before = {t.uri: os.path.getmtime(t.uri) for t in plan.tasks()}
    worker = VoteWorker(cfg, plan.num_classes)
    again = [worker.run_shard(t) for t in plan.tasks()]
    assert all(r.skipped for r in again)
    assert before == {t.uri: os.path.getmtime(t.uri) for t in plan.tasks()}


def test_truncated_and_foreign_shards_are_recomputed(reference, tmp_path):
    tmp, data, cfg, plan, _ = reference
    task_a, task_b = plan.tasks()[0], plan.tasks()[1]
    good_a = open(task_a.uri, "rb").read()
    with open(task_a.uri, "wb") as f:
        f.write(good_a[: len(good_a) // 2])  # truncated
    table = pq.read_table(task_b.uri)
    foreign = table.set_column(table.schema.get_field_index("config_hash"), "config_hash",
                               pa.array(["0" * 16] * len(table)))
    pq.write_table(foreign, task_b.uri)
    assert shard_is_complete(task_a)[1].startswith("unreadable")
    assert "another config" in shard_is_complete(task_b)[1]
    worker = VoteWorker(cfg, plan.num_classes)
    res_a, res_b = worker.run_shard(task_a), worker.run_shard(task_b)
    assert not res_a.skipped and res_a.recomputed_reason.startswith("unreadable")
    assert not res_b.skipped and "another config" in res_b.recomputed_reason
    assert shard_is_complete(task_a) == (True, "") and shard_is_complete(task_b) == (True, "")
    assert pq.read_table(task_a.uri).column("counts").to_pylist() == \
        pq.read_table(pa.BufferReader(good_a)).column("counts").to_pylist()


def test_counts_identical_for_any_shard_size_and_batch_size(reference, tmp_path):
    tmp, data, cfg, plan, _ = reference
    ref = counts_by_key(cfg.out)
    other = dict(data, shard_size=5, batch_size=5, out=str(tmp_path / "other"))
    run_in_process(other)
    got = counts_by_key(other["out"])
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in ref.items()}
    assert len(got) == 6 * 2 * 3  # images x sigmas x methods


def test_ray_actors_give_identical_counts(reference, tmp_path):
    tmp, data, cfg, plan, _ = reference
    other = load_config(data=dict(data, shard_size=1, workers=2, out=str(tmp_path / "ray")))
    ray_plan = plan_run(other)
    seen = []
    results = run_vote_stage(other, ray_plan, on_result=seen.append)
    assert len(results) == len(seen) == len(ray_plan.tasks()) == 6 * 2 * 3  # 6 one-image shards
    assert {r.worker.split("@")[0] for r in results} <= {"actor-0", "actor-1"}  # actor-i@host/node
    assert {k: v[:2] for k, v in counts_by_key(other.out).items()} == \
        {k: v[:2] for k, v in counts_by_key(cfg.out).items()}
