"""tasks/common/sqlfuncs.py (statistics UDFs), tasks/query.py (read-only results connection), tasks/common/textfmt.py."""

from __future__ import annotations

import hashlib
import os

import duckdb
import numpy as np
import pytest
from scipy import special
from scipy.stats import binomtest
from votes_factory import hand_votes, make_votes, write_votes

from densepure_core.certification.stats import certified_radius, clopper_pearson_lower
from tasks.certify.aggregate import aggregate
from tasks.certify.aggregate_sql import certificates_sql
from tasks.query import QueryError, RunIndexError, connect, run_query
from tasks.common.sqlfuncs import register_udfs
from tasks.common.textfmt import format_rows


def tree(root) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes and its mtime."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = f"{hashlib.sha256(fh.read()).hexdigest()} {os.stat(p).st_mtime_ns}"
    return out


@pytest.fixture
def hand_out(tmp_path):
    hand_votes(tmp_path)
    aggregate(str(tmp_path), alpha=0.001, radii=[0, 0.5, 1.0, 1.5])
    return str(tmp_path)


def test_udfs_equal_densepure_core_stats():
    con = duckdb.connect()
    register_udfs(con)
    register_udfs(con)  # idempotent
    n_a = np.array([0, 1, 5, 50, 99, 100])
    got = np.array([r[0] for r in con.execute(
        "SELECT cp_lower(x, 100, 0.001) FROM unnest(?) t(x) ORDER BY x",
        [n_a.tolist()]).fetchall()])
    np.testing.assert_array_equal(got, clopper_pearson_lower(n_a, 100, 0.001))
    assert got[0] == 0.0 and got[-1] == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    (ppf, rad, no_rad, pval, null), = con.sql(
        "SELECT norm_ppf(0.975), smoothing_radius(0.5, 0.9), smoothing_radius(0.5, 0.3), "
        "binom_pvalue(60, 40), cp_lower(NULL, 10, 0.1)").fetchall()
    assert ppf == special.ndtri(0.975)
    assert rad == certified_radius(0.5, 0.9) and no_rad == 0.0
    assert pval == pytest.approx(binomtest(60, 100, 0.5).pvalue, rel=1e-12)
    assert null is None
    with pytest.raises(duckdb.Error, match="n_a must be <= n"):
        con.sql("SELECT cp_lower(11, 10, 0.1)").fetchall()
    con.close()


def test_connection_is_read_only(hand_out, tmp_path_factory):
    before = tree(hand_out)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    con = connect(hand_out)
    assert con.sql("SELECT count(*) FROM votes").fetchall() == [(6,)]
    assert con.sql("SELECT count(*) FROM accuracy").fetchall() == [(4,)]
    refused = [
        f"COPY certificates TO '{hand_out}/tables/certificates.parquet' (FORMAT parquet)",
        f"COPY (SELECT 1) TO '{elsewhere}/x.csv'",
        f"EXPORT DATABASE '{elsewhere}/dump'",
        f"ATTACH '{elsewhere}/db.duckdb' AS other",
        f"SELECT * FROM read_parquet('{hand_out}/tables/accuracy.parquet')",
        "INSERT INTO certificates SELECT * FROM certificates",
        "DELETE FROM votes",
        "UPDATE accuracy SET certified_accuracy = 1.0",
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "INSTALL httpfs",
    ]
    for sql in refused:
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    # the data is still there and still right
    assert con.sql("SELECT count(*) FROM certificates WHERE prediction = -1").fetchall() == [(2,)]
    con.close()
    assert tree(hand_out) == before
    assert os.listdir(elsewhere) == []


def test_connect_with_alpha_recertifies_without_writing(hand_out):
    before = tree(hand_out)
    con = connect(hand_out, alpha=0.2)
    rows = con.sql("SELECT image_id, n_a, n, p_a_lower, alpha FROM certificates "
                   "ORDER BY image_id").fetchall()
    assert {r[4] for r in rows} == {0.2}
    n_a = np.array([r[1] for r in rows])
    np.testing.assert_allclose([r[3] for r in rows], clopper_pearson_lower(n_a, 1000, 0.2),
                               rtol=1e-12, atol=0)
    # b (500 of 1000) still abstains; d (400) too; the bound rises with alpha
    plain = connect(hand_out)
    published = dict(plain.sql("SELECT image_id, p_a_lower FROM certificates").fetchall())
    plain.close()
    assert all(p > published[i] for i, _, _, p, _ in rows)
    # the radius grid of the published accuracy table is kept
    assert [r[0] for r in con.sql("SELECT DISTINCT radius FROM accuracy ORDER BY 1").fetchall()] \
        == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(duckdb.Error):
        con.execute(f"COPY certificates TO '{hand_out}/x.parquet'")
    con.close()
    assert tree(hand_out) == before


def test_certificates_sql_runs_on_the_votes_view(hand_out):
    con = connect(hand_out)
    assert con.sql(certificates_sql(0.001)).fetchall() == \
        con.sql("SELECT * FROM certificates").fetchall()
    con.close()


def test_run_query_formats_are_pinned(hand_out):
    sql = ("SELECT image_id, label, prediction, n_a, radius, correct FROM certificates "
           "WHERE image_id IN ('a', 'b', 'f') ORDER BY image_id")
    assert run_query(hand_out, sql) == (
        "image_id  label  prediction   n_a    radius  correct\n"
        "--------  -----  ----------  ----  --------  -------\n"
        "a             1           1   980  0.889017  true\n"
        "b             0          -1   500         0  false\n"
        "f            -1           1  1000   1.23163  NULL\n"
        "(3 rows)")
    assert run_query(hand_out, sql, fmt="csv") == (
        "image_id,label,prediction,n_a,radius,correct\n"
        "a,1,1,980,0.889017138211271,true\n"
        "b,0,-1,500,0.0,false\n"
        "f,-1,1,1000,1.2316313073904057,")
    assert run_query(hand_out, sql + " LIMIT 1", fmt="json") == (
        '[\n  {\n    "image_id": "a",\n    "label": 1,\n    "prediction": 1,\n'
        '    "n_a": 980,\n    "radius": 0.889017138211271,\n    "correct": true\n  }\n]')
    # the UDFs work in user queries too
    assert run_query(hand_out, "SELECT round(norm_ppf(0.5), 3) AS z", fmt="csv") == "z\n0.0"


def test_run_query_errors_say_what_to_do(hand_out, tmp_path_factory):
    with pytest.raises(QueryError, match="read-only"):
        run_query(hand_out, f"COPY certificates TO '{hand_out}/out.csv'")
    with pytest.raises(QueryError, match="unknown format"):
        run_query(hand_out, "SELECT 1", fmt="xml")
    votes_only = tmp_path_factory.mktemp("votes_only")
    write_votes(str(votes_only), make_votes(3, 3))
    with pytest.raises(QueryError, match="not published yet"):
        run_query(str(votes_only), "SELECT * FROM certificates")
    assert run_query(str(votes_only), "SELECT count(*) AS n FROM votes", fmt="csv") == "n\n3"
    with pytest.raises(RunIndexError, match="nothing to query under .*check the path"):
        connect(str(tmp_path_factory.mktemp("empty")))


def test_format_rows_edge_cases():
    cols, rows = ["name", "x", "flag"], [("a", 1.5, True), ("bb", None, False)]
    assert format_rows(cols, rows) == (
        "name     x  flag\n"
        "----  ----  -----\n"
        "a      1.5  true\n"
        "bb    NULL  false\n"
        "(2 rows)")
    assert format_rows(cols, [], "csv") == "name,x,flag"
    assert format_rows(["v"], [(float("nan"),)], "json") == '[\n  {\n    "v": null\n  }\n]'
