"""Adaptive-sampling vote rows: certificates with the anytime bound at any alpha, the contract's
checks of the sampling columns, old vote files read as fixed, and the vote stage end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from model_factory import tiny_job
from votes_factory import make_votes, write_votes

from densepure_core.certification import sequential
from densepure_core.config import load_config
from densepure_core.certification.stats import clopper_pearson_lower
from tasks.certify.aggregate import AggregateError, aggregate
from tasks.certify.plan import plan_run
from tasks.query import connect, run_query
from tasks.certify.vote import VoteWorker

LOOKS = [100, 200, 300, 500, 800, 1000]
STAGED = json.dumps({"looks": LOOKS, "split": "equal"}, sort_keys=True)


def adaptive_table(method="ada", bound="staged", params=STAGED):
    # a stopped at 200 (unanimous), b at 500, c at n_max; labels all 0
    counts0 = [[10, 0], [9, 1], [6, 4]]
    counts = [[200, 0], [450, 50], [560, 440]]
    return make_votes(3, counts0=counts0, counts=counts, labels=[0, 0, 0], sigma=0.5, method=method,
                      image_ids=["a", "b", "c"], sampling="adaptive", n_max=1000, bound=bound,
                      bound_params=params)


def certs(out):
    return {r["image_id"]: r for r in pq.read_table(os.path.join(out, "tables", "certificates.parquet")).to_pylist()}


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_adaptive_rows_use_the_anytime_bound_at_any_alpha(tmp_path, alpha):
    write_votes(str(tmp_path), adaptive_table())
    write_votes(str(tmp_path), make_votes(3, counts0=[[10, 0]] * 3, counts=[[200, 0], [450, 50], [560, 440]],
                                          labels=[0, 0, 0], sigma=0.5, method="fix",
                                          image_ids=["a", "b", "c"]))
    aggregate(str(tmp_path), alpha=alpha)
    rows = pq.read_table(os.path.join(tmp_path, "tables", "certificates.parquet")).to_pylist()
    ada = {r["image_id"]: r for r in rows if r["method"] == "ada"}
    fix = {r["image_id"]: r for r in rows if r["method"] == "fix"}
    for image, n_a, n in [("a", 200, 200), ("b", 450, 500), ("c", 560, 1000)]:
        want = float(sequential.anytime_lower_bound(n_a, n, alpha, "staged", looks=LOOKS, split="equal"))
        cp = float(clopper_pearson_lower(n_a, n, alpha))
        assert ada[image]["p_a_lower"] == want and want < cp
        assert ada[image]["sampling"] == "adaptive" and ada[image]["bound"] == "staged"
        assert fix[image]["p_a_lower"] == cp and fix[image]["bound"] == "clopper-pearson"
    # densepure sql --alpha goes through the same SQL
    con = connect(str(tmp_path), alpha=0.2)
    got = dict(con.sql("SELECT image_id, p_a_lower FROM certificates WHERE method = 'ada'").fetchall())
    con.close()
    assert got["b"] == float(sequential.anytime_lower_bound(450, 500, 0.2, "staged", looks=LOOKS))
    assert got["b"] != float(clopper_pearson_lower(450, 500, 0.2))
    assert "anytime_lower" in run_query(str(tmp_path), "SELECT function_name FROM duckdb_functions() "
                                                      "WHERE function_name = 'anytime_lower'")


def test_betabin_rows(tmp_path):
    write_votes(str(tmp_path), adaptive_table(bound="betabin", params=json.dumps({"a": 0.5, "b": 0.5})))
    aggregate(str(tmp_path), alpha=0.01)
    c = certs(str(tmp_path))
    assert c["b"]["p_a_lower"] == float(sequential.anytime_lower_bound(450, 500, 0.01, "betabin", a=0.5, b=0.5))


def test_hybrid_rows_at_any_alpha(tmp_path):
    # the default rule's bound: the one-sided mixture below n_max, and Clopper-Pearson too at n_max
    params = {"a": 0.5, "b": 0.5, "final": 0.75, "n_max": 1000}
    write_votes(str(tmp_path), adaptive_table(bound="hybrid", params=json.dumps(params)))
    for alpha in (0.001, 0.01):
        aggregate(str(tmp_path), alpha=alpha)
        c = certs(str(tmp_path))
        for image, n_a, n in [("a", 200, 200), ("b", 450, 500), ("c", 560, 1000)]:
            assert c[image]["p_a_lower"] == float(sequential.anytime_lower_bound(n_a, n, alpha, "hybrid", **params))
            assert c[image]["bound"] == "hybrid"
        assert c["c"]["p_a_lower"] >= float(clopper_pearson_lower(560, 1000, 0.75 * alpha))


@pytest.mark.parametrize("change, match", [
    (dict(bound="clopper-pearson"), "sampling, n_used, n_max or bound"),
    (dict(n_max=300), "sampling, n_used, n_max or bound"),  # n_used 500 > n_max
    (dict(params=json.dumps({"looks": [100, 1000]})), "cannot be evaluated"),  # 200 is not a look
    (dict(params="not json"), "cannot be evaluated"),
])
def test_inconsistent_sampling_columns_are_refused(tmp_path, change, match):
    n_max = change.pop("n_max", 1000)
    table = adaptive_table(**change)
    if n_max != 1000:
        import pyarrow as pa
        table = table.set_column(table.schema.get_field_index("n_max"), "n_max",
                                 pa.array([n_max] * 3, pa.int32()))
    write_votes(str(tmp_path), table)
    with pytest.raises(AggregateError, match=match):
        aggregate(str(tmp_path), alpha=0.01)


def test_fixed_rows_must_be_clopper_pearson_at_n(tmp_path):
    write_votes(str(tmp_path), make_votes(4, n0=10, n=100, bound="staged"))
    with pytest.raises(AggregateError, match="sampling, n_used, n_max or bound"):
        aggregate(str(tmp_path), alpha=0.01)


def test_vote_files_without_the_sampling_columns_read_as_fixed(tmp_path):
    table = make_votes(20, n0=10, n=100, seed=1)
    old = table.drop_columns(["sampling", "n_used", "n_max", "bound", "bound_params"])
    new_dir, old_dir = tmp_path / "new", tmp_path / "old"
    write_votes(str(new_dir), table)
    (uri,) = write_votes(str(old_dir), table)
    pq.write_table(old, uri)  # an OUT written before the sampling columns existed
    a, b = aggregate(str(new_dir), alpha=0.01), aggregate(str(old_dir), alpha=0.01)
    assert a.images == b.images == 20
    assert certs(str(new_dir)) == certs(str(old_dir))
    con = connect(str(old_dir), alpha=0.05)  # re-certification reads them as fixed too
    assert con.sql("SELECT DISTINCT sampling, bound FROM certificates").fetchall() == [("fixed", "clopper-pearson")]
    con.close()


# -- the vote stage ------------------------------------------------------------------------

def votes_of(out):
    rows = pq.read_table(os.path.join(out, "votes"), partitioning=None).to_pylist()
    return {(r["sigma"], r["method"], r["image_id"]): r for r in rows}


def run(data):
    cfg = load_config(data=data)
    plan = plan_run(cfg)
    worker = VoteWorker(cfg, plan.num_classes, "w")
    for t in plan.tasks():
        worker.run_shard(t)
    return cfg, plan


ADA = {"methods": [{"kind": "rs"}], "sigmas": [0.25], "n0": 4, "n": 40, "sampling": "adaptive",
       "adaptive": {"batch": 8, "bound": "staged"}}


def test_vote_stage_writes_adaptive_rows_and_rule_off_equals_fixed(tmp_path):
    cfg, _ = run(tiny_job(tmp_path, **ADA, out=str(tmp_path / "ada")))
    rows = votes_of(cfg.out)
    params = cfg.adaptive.bound_params(40)
    for r in rows.values():
        assert r["sampling"] == "adaptive" and r["bound"] == "staged" and r["n_max"] == 40
        assert r["n"] == r["n_used"] == sum(r["counts"]) and r["n_used"] in params["looks"]
        assert json.loads(r["bound_params"]) == params
    fixed, _ = run(tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.25], n0=4, n=40,
                            out=str(tmp_path / "fixed")))
    off, _ = run(tiny_job(tmp_path, **dict(ADA, adaptive={"batch": 8, "bound": "staged", "stop": False}),
                          out=str(tmp_path / "off")))
    f, o = votes_of(fixed.out), votes_of(off.out)
    assert f.keys() == o.keys() == rows.keys()
    for key in f:
        assert (f[key]["counts0"], f[key]["counts"]) == (o[key]["counts0"], o[key]["counts"])
        assert f[key]["sampling"] == "fixed" and f[key]["n_used"] == f[key]["n_max"] == 40
        assert o[key]["n_used"] == 40 and json.loads(o[key]["bound_params"]) == {"looks": [40], "split": "equal"}
        # adaptive's first n_used copies are fixed's: counts0 identical
        assert rows[key]["counts0"] == f[key]["counts0"]
    aggregate(cfg.out, alpha=0.01)
    aggregate(off.out, alpha=0.01)
    aggregate(fixed.out, alpha=0.01)
    # one look at n_max with all of alpha: the staged bound is fixed CERTIFY's
    assert certs(off.out) != {} and all(
        a["p_a_lower"] == b["p_a_lower"] and a["radius"] == b["radius"]
        for a, b in zip(certs(off.out).values(), certs(fixed.out).values()))


def test_a_run_killed_mid_shard_resumes_without_double_counting(tmp_path, monkeypatch):
    data = tiny_job(tmp_path, **ADA, out=str(tmp_path / "ref"))
    ref, _ = run(data)
    cfg = load_config(data=dict(data, out=str(tmp_path / "killed")))
    plan = plan_run(cfg)
    calls = {"n": 0}

    def crash(name):
        if name == "vote:mid-shard":
            calls["n"] += 1
            if calls["n"] == 3:  # the second shard, after its first image: nothing of it written
                raise KeyboardInterrupt("killed")

    import tasks.certify.vote as vote_module
    monkeypatch.setattr(vote_module, "fault_point", crash)
    worker = VoteWorker(cfg, plan.num_classes, "w")
    with pytest.raises(KeyboardInterrupt):
        for t in plan.tasks():
            worker.run_shard(t)
    monkeypatch.undo()
    resumed = [VoteWorker(cfg, plan.num_classes, "w2").run_shard(t) for t in plan.tasks()]
    assert resumed[0].skipped and not resumed[1].skipped
    a, b = votes_of(ref.out), votes_of(cfg.out)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key]["counts0"], a[key]["counts"], a[key]["n_used"]) == \
               (b[key]["counts0"], b[key]["counts"], b[key]["n_used"])
    result = aggregate(cfg.out, alpha=0.01, expected={(0.25, "rs"): len(a)})
    assert result.images == len(a)
    assert np.all([r["n"] == r["n_used"] for r in b.values()])


def test_report_says_adaptive_rows_use_the_anytime_bound(tmp_path):
    from tasks.certify.report import write_report

    write_votes(str(tmp_path / "a"), adaptive_table())
    aggregate(str(tmp_path / "a"), alpha=0.01)
    assert "anytime-valid" in write_report(str(tmp_path / "a"))
    write_votes(str(tmp_path / "f"), make_votes(4, n0=10, n=100))
    aggregate(str(tmp_path / "f"), alpha=0.01)
    assert "anytime-valid" not in write_report(str(tmp_path / "f"))
