"""The attack job's stages in-process (no Ray): plan, worker, resume, quarantine, views, summary."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from model_factory import attack_job
from scipy.stats import binomtest

from densepure_core.config.attack import AttackConfig
from tasks.attack.worker import AttackWorker
from tasks.attack.plan import PlanError, partition_key, plan_attack
from tasks.attack.summary import is_attack_out, write_attack_report
from tasks.common.layout import ATTACKS_SCHEMA
from tasks.query import connect, run_query


def run_all(cfg: AttackConfig, plan) -> list:
    worker = AttackWorker(cfg, "test-worker")
    return [worker.run_shard(t) for t in plan.tasks()]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack")
    cfg = AttackConfig.model_validate(attack_job(tmp))
    plan = plan_attack(cfg)
    results = run_all(cfg, plan)
    return tmp, cfg, plan, results


def test_plan_writes_the_run_and_partitions(done):
    _, cfg, plan, results = done
    out = Path(cfg.out)
    assert (out / "config.yaml").exists() and (out / "manifest.parquet").exists() and (out / "run.json").exists()
    assert plan.partitions == [("none", "linf-8", "pgd_eot"), ("purify-t0.1-s2-k2", "linf-8", "pgd_eot"),
                               ("purify-t0.1-s2-k2", "linf-8", "dwbox"), ("purify-t0.1-s2-k2", "linf-8", "bpda")]
    assert len(plan.records) == 6 and len(plan.shards) == 2
    assert len(results) == 8 and not any(r.skipped for r in results)
    assert is_attack_out(cfg.out)


def test_rows_hold_the_columns_of_the_contract(done):
    _, cfg, plan, _ = done
    rows = pq.read_table(Path(cfg.out) / "attacks", partitioning=None, schema=ATTACKS_SCHEMA).to_pylist()
    assert len(rows) == 6 * 4
    by = {(r["defense"], r["attack"], r["image_id"]): r for r in rows}
    assert len(by) == len(rows)  # one row per (image, defense, threat, attack)
    for r in rows:
        assert r["linf"] <= 8 / 255 + 1e-6 and r["iterations"] == 2
        # each partition's rows carry its identity and the fingerprints of the models that made them
        assert r["label"] in (0, 1)
        assert r["config_hash"] == plan.partition_hashes[partition_key(r["defense"], r["threat"], r["attack"])]
        assert r["classifier_fingerprint"] == plan.fingerprints[cfg.classifier.source]
        assert (r["diffusion_fingerprint"] is None) == (r["defense"] == "none")
    none = [r for r in rows if r["defense"] == "none"]
    assert all(r["score_purifications"] == 1 and r["eot"] == 1 and r["unet_calls"] == 0 for r in none)
    pgd = [r for r in rows if r["attack"] == "pgd_eot" and r["defense"] != "none"]
    # 2 iterations x 2 EOT x K=2, each purification 2 steps, exact (x2); scoring 2 x M=3 x K=2 x 2 steps
    assert all(r["gradient_calls"] == 8 and r["unet_calls"] == 8 * 2 * 2 + 2 * 3 * 2 * 2 for r in pgd)
    assert all(len(r["clean_predictions"]) == 3 and r["t_star"] == 100 for r in pgd)
    dw = [r for r in rows if r["attack"] == "dwbox"]
    assert all(r["score_purifications"] == 1 and r["eot"] == 2 for r in dw)  # scored under the fixed noise


def test_summary_view_and_report_agree_with_scipy(done):
    _, cfg, _, _ = done
    con = connect(cfg.out)
    try:
        rows = con.sql("SELECT * FROM attack_summary").to_arrow_table().to_pylist()
        raw = con.sql("""SELECT count(*), sum(CAST(adv_worst AS INT)), sum(CAST(clean_majority AS INT))
                         FROM attacks WHERE defense <> 'none' AND attack = 'bpda'""").fetchall()[0]
    finally:
        con.close()
    assert len(rows) == 4 * 3 and {r["rule"] for r in rows} == {"mean", "majority", "worst"}
    worst = next(r for r in rows if r["attack"] == "bpda" and r["defense"] != "none" and r["rule"] == "worst")
    n, k, clean_k = raw
    ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
    assert worst["images"] == n and worst["robust_accuracy"] == pytest.approx(k / n)
    assert (worst["robust_low"], worst["robust_high"]) == pytest.approx((ci.low, ci.high))
    majority = next(r for r in rows if r["attack"] == "bpda" and r["defense"] != "none" and r["rule"] == "majority")
    assert majority["clean_accuracy"] == pytest.approx(clean_k / n)
    report = write_attack_report(cfg.out)
    assert "| purify-t0.1-s2-k2 | linf-8 | bpda | 6 |" in report
    published = pq.read_table(Path(cfg.out) / "tables" / "attack_summary.parquet").to_pylist()
    assert [(r["defense"], r["attack"], r["rule"], r["robust_accuracy"]) for r in published] == \
           [(r["defense"], r["attack"], r["rule"], r["robust_accuracy"]) for r in rows]
    text = run_query(cfg.out, "SELECT count(*) AS n FROM attacks", fmt="csv")
    assert text.splitlines()[-1] == "24"


def test_resume_skips_complete_shards_and_recomputes_a_truncated_one(done):
    _, cfg, plan, _ = done
    again = plan_attack(cfg)
    assert again.run_id == plan.run_id and again.resumed
    victim = plan.tasks()[3]
    before = pq.read_table(victim.uri).to_pylist()
    Path(victim.uri).write_bytes(Path(victim.uri).read_bytes()[:100])  # truncated
    results = run_all(cfg, again)
    assert [r.skipped for r in results].count(False) == 1
    after = pq.read_table(victim.uri).to_pylist()
    keys = ("image_id", "adv_predictions", "clean_predictions", "linf", "l2", "adv_worst")
    assert [tuple(r[k] for k in keys) for r in after] == [tuple(r[k] for k in keys) for r in before]


def test_a_different_config_or_a_certify_out_is_refused(done, tmp_path):
    tmp, cfg, _, _ = done
    other = AttackConfig.model_validate(attack_job(tmp, score_purifications=5))
    with pytest.raises(PlanError, match="score_purifications"):
        plan_attack(other)
    certify_out = tmp_path / "certify"
    certify_out.mkdir()
    (certify_out / "config.yaml").write_text("run_name: x\n")
    with pytest.raises(PlanError, match="certification run"):
        plan_attack(cfg, str(certify_out))


def test_unlabelled_images_are_refused_at_plan_time(tmp_path):
    import pyarrow as pa

    data = attack_job(tmp_path)
    manifest = tmp_path / "m.parquet"
    images = sorted((tmp_path / "data").rglob("*.png"))
    pq.write_table(pa.table({"image_id": [f"{p.parent.name}/{p.name}" for p in images], "uri": [str(p) for p in images],
                             "label": [-1] * len(images)}), manifest)
    data["dataset"] = {"kind": "manifest", "path": str(manifest), "image_size": 8}
    with pytest.raises(PlanError, match="no label"):
        plan_attack(AttackConfig.model_validate(data))


def test_a_corrupt_image_is_quarantined_or_stops_the_run(tmp_path):
    data = attack_job(tmp_path, defenses=[{"kind": "none"}], attacks=[{"kind": "pgd_eot", "iterations": 1}],
                      on_bad_input="quarantine")
    bad = sorted((tmp_path / "data").rglob("*.png"))[1]
    bad.write_bytes(b"not a png")
    cfg = AttackConfig.model_validate(data)
    plan = plan_attack(cfg)
    results = run_all(cfg, plan)
    assert sum(r.quarantined for r in results) == 1 and sum(r.images for r in results) == 5
    con = connect(cfg.out)
    try:
        errors = con.sql("SELECT image_id, method FROM errors").fetchall()
    finally:
        con.close()
    assert errors == [(plan.records[1].image_id, "none/linf-8/pgd_eot")]
    assert all(r.skipped for r in run_all(cfg, plan))  # complete with its quarantined image
    failing = AttackConfig.model_validate({**data, "on_bad_input": "fail", "out": str(tmp_path / "out2")})
    with pytest.raises(ValueError, match="on_bad_input: quarantine"):
        run_all(failing, plan_attack(failing))


def test_attack_rows_summary_and_resume_on_s3(tmp_path, s3_endpoint, monkeypatch):
    """OUT on a real (moto) S3 server: plan, rows, views, report, and a resume that skips all."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("attack-bucket")
    out = "s3://attack-bucket/runs/tiny"
    cfg = AttackConfig.model_validate(attack_job(tmp_path, out=out, defenses=[{"kind": "none"}],
                                                 attacks=[{"kind": "pgd_eot", "iterations": 1}]))
    plan = plan_attack(cfg)
    assert not any(r.skipped for r in run_all(cfg, plan))
    assert is_attack_out(out)
    report = write_attack_report(out)
    assert "| none | linf-8 | pgd_eot | 6 |" in report
    keys = fs.find("attack-bucket/runs/tiny")
    assert "attack-bucket/runs/tiny/tables/attack_summary.parquet" in keys
    assert len([k for k in keys if "/attacks/" in k]) == 2 and not [k for k in keys if ".tmp-" in k]
    assert run_query(out, "SELECT sum(images) FROM attack_summary WHERE rule = 'worst'", fmt="csv").splitlines()[-1] == "6"
    assert all(r.skipped for r in run_all(cfg, plan_attack(cfg)))


def test_defenses_are_built_with_the_configured_chain(tmp_path):
    data = attack_job(tmp_path, defenses=[
        {"kind": "purify", "name": "by-sigma", "sigma": 0.25, "steps": 3},
        {"kind": "purify", "name": "one-shot", "t_fraction": 0.05, "reverse": "one_shot"},
        {"kind": "purify", "name": "full", "t_fraction": 0.01}])
    worker = AttackWorker(AttackConfig.model_validate(data))
    by_sigma, one, full = (worker.defense(n) for n in ("by-sigma", "one-shot", "full"))
    assert by_sigma.t_star == 144 and by_sigma.process.timesteps == (144, 96, 48)  # the certification t*
    assert one.t_star == 50 and one.process.timesteps == (50,) and one.noise_draws == 1
    assert full.t_star == 10 and full.process.timesteps == tuple(range(10, -1, -1)) and full.noise_draws == 11
    assert worker.defense("full") is full  # built once


def test_diffbreaks_any_iterate_protocol_next_to_the_last_iterate_rules(tmp_path):
    data = attack_job(tmp_path, any_iterate=True, iterate_purifications=4)
    cfg = AttackConfig.model_validate(data)
    plan = plan_attack(cfg)
    run_all(cfg, plan)
    rows = pq.read_table(Path(cfg.out) / "attacks", partitioning=None, schema=ATTACKS_SCHEMA).to_pylist()
    for r in rows:
        m = 1 if r["defense"] == "none" or r["attack"] == "dwbox" else 4
        assert r["iterate_purifications"] == m
        assert -1 <= r["broken_at_worst"] <= r["iterations"] and -1 <= r["broken_at_majority"] <= r["iterations"]
        if r["broken_at_majority"] != -1:  # a wrong majority is a wrong prediction: worst case broke no later
            assert 0 <= r["broken_at_worst"] <= r["broken_at_majority"]
    con = connect(cfg.out)
    try:
        summary = con.sql("SELECT * FROM attack_summary").to_arrow_table().to_pylist()
        raw = con.sql("""SELECT count(*) FILTER (WHERE broken_at_worst = -1), count(*) FILTER (WHERE broken_at_worst <> 0)
                         FROM attacks WHERE attack = 'bpda'""").fetchall()[0]
    finally:
        con.close()
    assert [r["rule"] for r in summary[:5]] == ["mean", "majority", "worst", "majority_any", "worst_any"]
    any_worst = next(r for r in summary if r["attack"] == "bpda" and r["rule"] == "worst_any")
    assert any_worst["robust_accuracy"] == pytest.approx(raw[0] / 6)
    assert any_worst["clean_accuracy"] == pytest.approx(raw[1] / 6)
    report = write_attack_report(cfg.out)
    assert "robust worst (any, M')" in report and "robust worst (last, M)" in report


def test_rows_without_the_any_iterate_check_have_no_any_iterate_rules(done):
    _, cfg, _, _ = done
    assert not cfg.any_iterate
    rows = pq.read_table(Path(cfg.out) / "attacks", partitioning=None, schema=ATTACKS_SCHEMA).to_pylist()
    assert all(r["iterate_purifications"] is None and r["broken_at_worst"] is None for r in rows)
    con = connect(cfg.out)
    try:
        rules = {r[0] for r in con.sql("SELECT DISTINCT rule FROM attack_summary").fetchall()}
    finally:
        con.close()
    assert rules == {"mean", "majority", "worst"}
    assert "| - | - |" in write_attack_report(cfg.out)
