"""Stage 3 (tasks/certify/aggregate.py): SQL certificates equal the numpy reference; bad votes are refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from votes_factory import HAND_IDS, counts_matrix, hand_votes, make_votes, vote_uri, write_votes

from densepure_core.certification.stats import (
    ABSTAIN,
    certified_accuracy,
    certify_from_counts,
    clopper_pearson_lower,
)
from densepure_core.config import DEFAULT_RADII
from tasks.certify.aggregate import AggregateError, aggregate
from tasks.common.layout import ACCURACY_SCHEMA, CERTIFICATES_SCHEMA, VOTES_SCHEMA
from tasks.common.run_dir import RunDir

def read(uri) -> pa.Table:
    return pq.read_table(uri)


def partition(table: pa.Table, sigma: float, method: str, key: str = "image_id") -> pa.Table:
    mask = pc.and_(pc.equal(table["sigma"], sigma), pc.equal(table["method"], method))
    return table.filter(mask).sort_by(key)


def test_factory_writes_the_votes_schema(tmp_path):
    table = make_votes(7, 4, seed=1)
    assert table.schema.equals(VOTES_SCHEMA)
    files = write_votes(str(tmp_path), table, shard_size=3)
    assert files == [vote_uri(str(tmp_path), 0.25, "dds", i) for i in range(3)]
    assert files[0].endswith(
        os.path.join("votes", "sigma=0.25", "method=dds", "shard=00000.parquet"))
    assert RunDir(str(tmp_path)).vote_files() == files
    back = pa.concat_tables(read(f) for f in files)
    assert back.schema.equals(VOTES_SCHEMA) and back.num_rows == 7
    # counts add up to n0 / n, like the vote stage's
    assert (counts_matrix(back["counts0"]).sum(axis=1) == 100).all()
    assert (counts_matrix(back["counts"]).sum(axis=1) == 1000).all()


def test_certificates_equal_certify_from_counts(tmp_path):
    rng = np.random.default_rng(7)
    tables = []
    for i, (sigma, method, classes) in enumerate([(0.25, "dds", 10), (0.25, "densepure", 10),
                                                  (1.0, "dds", 10), (0.5, "dds", 1000)]):
        num = 40 if classes == 1000 else 300
        table = make_votes(num, classes, sigma=sigma, method=method, n=500, seed=i)
        if i == 1:  # small random counts0: many ties, many abstentions
            c0 = rng.integers(0, 3, (num, classes))
            c0[:, 0] += c0.sum(axis=1) == 0
            c = rng.multinomial(50, np.full(classes, 1 / classes), size=num)
            table = make_votes(0, sigma=sigma, method=method, counts0=c0, counts=c, seed=i)
        tables.append(table)
        write_votes(str(tmp_path), table, shard_size=64)
    result = aggregate(str(tmp_path), alpha=0.001)
    assert result.images == 940 and result.files == sum(-(-t.num_rows // 64) for t in tables)
    cert = read(result.certificates_uri)
    assert cert.schema.equals(CERTIFICATES_SCHEMA)
    abstained_any = False
    for table in tables:
        sigma, method = table["sigma"][0].as_py(), table["method"][0].as_py()
        votes, got = partition(table, sigma, method), partition(cert, sigma, method)
        assert got["image_id"].to_pylist() == votes["image_id"].to_pylist()
        ref = certify_from_counts(counts_matrix(votes["counts0"]), counts_matrix(votes["counts"]),
                                  sigma, 0.001)
        np.testing.assert_array_equal(got["prediction"].to_numpy(), ref.prediction)
        np.testing.assert_array_equal(got["n_a"].to_numpy(), ref.n_a)
        np.testing.assert_array_equal(got["n"].to_numpy(), ref.n)
        np.testing.assert_allclose(got["p_a_lower"].to_numpy(), ref.p_a_lower, rtol=1e-12, atol=0)
        np.testing.assert_allclose(got["radius"].to_numpy(), ref.radius, rtol=1e-12, atol=0)
        label = votes["label"].to_numpy()
        np.testing.assert_array_equal(got["correct"].to_numpy(zero_copy_only=False),
                                      ref.prediction == label)
        abstained_any |= bool((ref.prediction == ABSTAIN).any())
    assert abstained_any
    # accuracy equals stats.certified_accuracy on the same certificates
    acc = read(result.accuracy_uri)
    assert acc.schema.equals(ACCURACY_SCHEMA)
    assert acc.num_rows == 4 * len(DEFAULT_RADII)
    for table in tables:
        sigma, method = table["sigma"][0].as_py(), table["method"][0].as_py()
        got = partition(cert, sigma, method)
        rows = partition(acc, sigma, method, key="radius")
        ref = certified_accuracy(got["radius"].to_numpy(),
                                 got["correct"].to_numpy(zero_copy_only=False).astype(bool),
                                 rows["radius"].to_numpy())
        np.testing.assert_array_equal(rows["certified_accuracy"].to_numpy(), ref)
        assert set(rows["images"].to_pylist()) == {table.num_rows}


def test_hand_example_is_pinned(tmp_path):
    hand_votes(tmp_path)
    result = aggregate(str(tmp_path), alpha=0.001, radii=[1.5, 0, 0.5, 1.0])
    cert = read(result.certificates_uri).to_pylist()
    assert [r["image_id"] for r in cert] == HAND_IDS
    assert [r["prediction"] for r in cert] == [1, -1, 2, -1, 0, 1]
    assert [r["n_a"] for r in cert] == [980, 500, 1000, 400, 1000, 1000]
    assert [r["n"] for r in cert] == [1000] * 6
    assert [r["correct"] for r in cert] == [True, False, True, False, False, None]
    assert {r["alpha"] for r in cert} == {0.001}
    p = [r["p_a_lower"] for r in cert]
    assert p == pytest.approx([0.9623008872307984, 0.45077105398478234, 0.9931160484209338,
                               0.35243071192018244, 0.9931160484209338, 0.9931160484209338],
                              rel=1e-12)
    assert [r["radius"] for r in cert] == pytest.approx(
        [0.889017138211271, 0.0, 1.2316313073904057, 0.0, 1.2316313073904057,
         1.2316313073904057], rel=1e-12)
    # nA = n: the bound is alpha ** (1 / n)
    assert p[2] == pytest.approx(0.001 ** (1 / 1000), rel=1e-12)


def test_ties_go_to_the_lowest_class_index(tmp_path):
    counts0 = [[0, 7, 7, 1], [3, 0, 3, 0], [0, 0, 5, 5], [4, 4, 4, 4]]
    counts = [[0, 0, 100, 0], [100, 0, 0, 0], [0, 0, 100, 0], [0, 0, 0, 100]]
    write_votes(str(tmp_path), make_votes(0, counts0=counts0, counts=counts,
                                          image_ids=["w", "x", "y", "z"], labels=[1, 0, 2, 3]))
    cert = read(aggregate(str(tmp_path), alpha=0.001).certificates_uri)
    # argmax picks class 1, 0, 2, 0; n_a = counts[argmax]
    assert cert["n_a"].to_pylist() == [0, 100, 100, 0]
    assert cert["prediction"].to_pylist() == [-1, 0, 2, -1]
    assert cert["p_a_lower"][0].as_py() == 0.0


def test_accuracy_table_is_pinned(tmp_path):
    hand_votes(tmp_path)
    result = aggregate(str(tmp_path), alpha=0.001, radii=[1.5, 0, 0.5, 1.0])
    assert result.radii == (0.0, 0.5, 1.0, 1.5)
    acc = read(result.accuracy_uri).to_pylist()
    # labeled images a..e (f has no label): correct a (r 0.889) and c (r 1.232)
    assert acc == [
        {"run_id": "run-test", "sigma": 0.5, "method": "dds", "alpha": 0.001, "radius": r,
         "certified_accuracy": a, "images": 5}
        for r, a in [(0.0, 0.4), (0.5, 0.4), (1.0, 0.2), (1.5, 0.0)]]
    (part,) = result.partitions
    assert (part.images, part.labeled, part.abstained, part.num_classes) == (6, 5, 2, 3)
    summary = json.loads(open(result.summary_uri).read())
    assert summary["alpha"] == 0.001 and summary["radii"] == [0.0, 0.5, 1.0, 1.5]
    assert summary["partitions"][0]["images"] == 6 and summary["missing"] == 0


def test_default_radii_grid_is_the_configs(tmp_path):
    """One radius grid in the project: the aggregate's default is densepure_core.config's."""
    import tasks.certify.aggregate as agg
    import tasks.certify.aggregate_sql as agg_sql

    assert agg.check_radii(None) == agg_sql.check_radii(None) == tuple(DEFAULT_RADII)
    for module in (agg, agg_sql):
        assert not any(isinstance(v, (list, tuple)) and name.endswith("RADII")
                       and v is not DEFAULT_RADII
                       for name, v in vars(module).items())  # no second grid defined here
    write_votes(str(tmp_path), make_votes(5, 3))
    result = aggregate(str(tmp_path), alpha=0.001)
    assert result.radii == tuple(DEFAULT_RADII)
    assert sorted(set(read(result.accuracy_uri)["radius"].to_pylist())) == list(DEFAULT_RADII)
    assert json.loads(open(result.summary_uri).read())["radii"] == list(DEFAULT_RADII)


def test_new_alpha_recertifies_from_the_same_votes(tmp_path):
    write_votes(str(tmp_path), make_votes(200, 10, n=300, seed=3))
    low = read(aggregate(str(tmp_path), alpha=0.001).certificates_uri)
    high = read(aggregate(str(tmp_path), alpha=0.05).certificates_uri)
    n_a, n = low["n_a"].to_numpy(), low["n"].to_numpy()
    assert high["n_a"].to_pylist() == low["n_a"].to_pylist()
    np.testing.assert_allclose(high["p_a_lower"].to_numpy(), clopper_pearson_lower(n_a, n, 0.05),
                               rtol=1e-12, atol=0)
    # a larger alpha is a weaker guarantee: a higher bound wherever n_a > 0
    pos = n_a > 0
    assert (high["p_a_lower"].to_numpy()[pos] > low["p_a_lower"].to_numpy()[pos]).all()
    assert (high["radius"].to_numpy() >= low["radius"].to_numpy()).all()
    assert set(high["alpha"].to_pylist()) == {0.05}


def test_duplicates_are_refused_naming_them(tmp_path):
    table = make_votes(10, 3, seed=0)
    write_votes(str(tmp_path), table)
    write_votes(str(tmp_path), table.slice(4, 2), first_shard=1)  # img4, img5 again
    with pytest.raises(AggregateError) as err:
        aggregate(str(tmp_path), alpha=0.001)
    msg = str(err.value)
    assert "2 image(s)" in msg and "img0000004" in msg and "img0000005" in msg
    assert "shard=00000.parquet" in msg and "shard=00001.parquet" in msg
    assert not os.path.exists(tmp_path / "tables")  # nothing published


def test_a_partition_voted_by_two_models_is_refused_naming_its_files(tmp_path):
    """Issue 22 item 2: shards voted with another model under the same source are never pooled."""
    write_votes(str(tmp_path), make_votes(4, 3, seed=0, classifier_fingerprint="aaaa"))
    write_votes(str(tmp_path), make_votes(4, 3, seed=1, first_image=4, classifier_fingerprint="bbbb"), first_shard=1)
    with pytest.raises(AggregateError) as err:
        aggregate(str(tmp_path), alpha=0.001)
    msg = str(err.value)
    assert "sigma=0.25 method=dds was voted by 2 different models" in msg and "['aaaa', 'bbbb']" in msg
    assert "shard=00000.parquet" in msg and "shard=00001.parquet" in msg and "new --out" in msg
    assert not os.path.exists(tmp_path / "tables")
    # files written before fingerprints were recorded (NULL) are unknown, not another model
    other = tmp_path / "old"
    write_votes(str(other), make_votes(4, 3, seed=0, classifier_fingerprint=None, diffusion_fingerprint=None))
    write_votes(str(other), make_votes(4, 3, seed=1, first_image=4), first_shard=1)
    assert aggregate(str(other), alpha=0.001).images == 8


def test_two_runs_in_one_partition_name_their_files_and_the_repair_command(tmp_path):
    write_votes(str(tmp_path), make_votes(4, 3, seed=0, run_id="run-a"))
    write_votes(str(tmp_path), make_votes(4, 3, seed=1, first_image=4, run_id="run-b"), first_shard=1)
    with pytest.raises(AggregateError) as err:
        aggregate(str(tmp_path), alpha=0.001)
    msg = str(err.value)
    assert "mixes 2 values of run_id: ['run-a', 'run-b']" in msg and "densepure repair OUT" in msg
    assert "run-a: " in msg and "shard=00000.parquet" in msg and "run-b: " in msg


def test_missing_images_refused_unless_allow_partial(tmp_path):
    write_votes(str(tmp_path), make_votes(8, 3, seed=0))
    expected = {(0.25, "dds"): 10, (0.5, "dds"): 4}
    with pytest.raises(AggregateError) as err:
        aggregate(str(tmp_path), alpha=0.001, expected=expected)
    msg = str(err.value)
    assert "8 of 10 images (2 missing)" in msg and "0 of 4 images (4 missing)" in msg
    assert "allow_partial" in msg
    assert not os.path.exists(tmp_path / "tables")

    result = aggregate(str(tmp_path), alpha=0.001, expected=expected, allow_partial=True)
    assert result.partial and result.missing == 6 and result.images == 8
    by_key = {(p.sigma, p.method): p for p in result.partitions}
    assert (by_key[(0.25, "dds")].expected, by_key[(0.25, "dds")].missing) == (10, 2)
    assert (by_key[(0.5, "dds")].images, by_key[(0.5, "dds")].missing) == (0, 4)
    assert "MISSING" in result.describe()
    summary = json.loads(open(result.summary_uri).read())
    assert summary["partial"] is True and summary["missing"] == 6
    # complete partitions pass without allow_partial
    assert aggregate(str(tmp_path), alpha=0.001, expected={(0.25, "dds"): 8}).missing == 0


def test_more_images_than_expected_is_refused(tmp_path):
    write_votes(str(tmp_path), make_votes(5, 3))
    with pytest.raises(AggregateError, match="more images than expected"):
        aggregate(str(tmp_path), alpha=0.001, expected={(0.25, "dds"): 4}, allow_partial=True)


def test_mixed_configs_in_one_partition_are_refused(tmp_path):
    write_votes(str(tmp_path), make_votes(3, 3, config_hash="aaa"))
    write_votes(str(tmp_path), make_votes(3, 3, config_hash="bbb", first_image=3), first_shard=1)
    with pytest.raises(AggregateError, match=r"mixes 2 values of config_hash: \['aaa', 'bbb'\]"):
        aggregate(str(tmp_path), alpha=0.001)


def test_counts_that_do_not_add_up_are_refused(tmp_path):
    table = make_votes(4, 3)
    n = pa.array([1000, 1000, 999, 1000], pa.int32())  # row 2 claims 999 copies
    write_votes(str(tmp_path), table.set_column(table.schema.get_field_index("n"), "n", n))
    with pytest.raises(AggregateError, match="1 rows whose counts0 do not sum to n0 or counts"):
        aggregate(str(tmp_path), alpha=0.001)


def test_misplaced_and_stray_files_are_refused(tmp_path):
    table = make_votes(3, 3, sigma=0.5)
    uri = vote_uri(str(tmp_path), 0.25, "dds", 0)  # sigma=0.5 rows under sigma=0.25/
    os.makedirs(os.path.dirname(uri))
    pq.write_table(table, uri)
    with pytest.raises(AggregateError, match="another partition than their directory"):
        aggregate(str(tmp_path), alpha=0.001)
    os.remove(uri)
    write_votes(str(tmp_path), table)
    pq.write_table(table, tmp_path / "votes" / "extra.parquet")
    with pytest.raises(AggregateError, match="not in the layout"):
        aggregate(str(tmp_path), alpha=0.001)


def test_no_votes_and_bad_arguments(tmp_path):
    with pytest.raises(AggregateError, match="no vote files"):
        aggregate(str(tmp_path), alpha=0.001)
    write_votes(str(tmp_path), make_votes(2, 3))
    with pytest.raises(ValueError, match="alpha must lie in"):
        aggregate(str(tmp_path), alpha=1.5)
    with pytest.raises(ValueError, match="radii must be"):
        aggregate(str(tmp_path), alpha=0.001, radii=[-1.0])


def test_rerun_is_idempotent_and_leaves_no_temp_files(tmp_path):
    write_votes(str(tmp_path), make_votes(50, 5, seed=2), shard_size=20)
    first = aggregate(str(tmp_path), alpha=0.001)
    before = {f: open(tmp_path / "tables" / f, "rb").read() for f in
              ("certificates.parquet", "accuracy.parquet")}
    aggregate(str(tmp_path), alpha=0.001)
    after = {f: open(tmp_path / "tables" / f, "rb").read() for f in before}
    assert before == after
    assert sorted(os.listdir(tmp_path / "tables")) == ["accuracy.parquet", "certificates.parquet",
                                                       "summary.json"]
    assert first.images_per_partition() == {(0.25, "dds"): 50}
    assert set(first.timings) >= {"read_votes", "checks", "certify", "accuracy", "write"}


def test_aggregate_on_s3(s3_endpoint, monkeypatch):
    import s3fs

    from tasks.query import run_query

    # tasks/common/storage.py takes the endpoint from the AWS environment chain (older builds read
    # DENSEPURE_S3_ENDPOINT_URL; setting both keeps the test valid for either).
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("DENSEPURE_S3_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("agg-bucket")
    out = "s3://agg-bucket/run1"
    write_votes(out, make_votes(30, 4, seed=5), shard_size=10)
    write_votes(out, make_votes(20, 4, sigma=0.5, seed=6))
    result = aggregate(out, alpha=0.001, expected={(0.25, "dds"): 30, (0.5, "dds"): 20})
    assert result.images == 50 and result.certificates_uri.startswith("s3://")
    text = run_query(out, "SELECT sigma, count(*) AS images FROM certificates GROUP BY ALL "
                          "ORDER BY sigma", fmt="csv")
    assert text == "sigma,images\n0.25,30\n0.5,20"
    again = run_query(out, "SELECT count(*) AS n FROM certificates WHERE alpha = 0.01", alpha=0.01,
                      fmt="csv")
    assert again == "n\n50"
