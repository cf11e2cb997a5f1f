"""The certification job's SQL views: ``votes``, ``certificates``, ``accuracy``.

- ``votes``: every vote shard, a lazy scan of the Parquet files (docs/schema.md);
- ``certificates`` and ``accuracy``: the published ``OUT/tables/*.parquet``, or, with
  ``alpha=...``, tables re-certified from the stored counts at that alpha (no GPU, nothing
  written), on the radius grid of the published accuracy table (or the default grid), after the
  same checks as the aggregate stage except the expected-image count. Without published tables
  only ``votes`` is there.
"""

from __future__ import annotations

import posixpath

import duckdb

from tasks.certify import aggregate as agg
from tasks.certify.aggregate_sql import check_alpha
from tasks.common import layout
from tasks.common.run_dir import RunDir
from tasks.common.sql import QueryError, lazy_dataset
from tasks.common.sql import connect as _connect

__all__ = ["register", "connect"]


def register(con: duckdb.DuckDBPyConnection, run: RunDir, alpha: float | None) -> list[str]:
    """Register the certification views of OUT on ``con`` (see the module docstring).

    Raises:
        QueryError: ``alpha`` was given but there are no votes.
        tasks.certify.aggregate_checks.AggregateError: with ``alpha``, the votes fail the aggregate checks.
    """
    if alpha is not None:
        alpha = check_alpha(alpha)
    files = run.vote_files()
    cert_uri = run.tables_uri("certificates.parquet")
    acc_uri = run.tables_uri("accuracy.parquet")
    # One listing instead of one existence check per table: each is a round trip on S3.
    published = {posixpath.basename(u) for u in run.list_files(run.tables_dir, ".parquet")}
    have_tables = {"certificates.parquet", "accuracy.parquet"} <= published
    if alpha is not None and not files:
        raise QueryError(f"alpha={alpha!r} re-certifies from the votes, but there are no vote "
                         f"files under {run.votes_dir}: check the OUT path")
    names = []
    if files:
        con.register("votes", lazy_dataset(run, files, layout.VOTES_SCHEMA))
        names.append("votes")
    if alpha is not None:
        radii = None
        if have_tables:  # keep the published grid, so the two tables compare row by row
            acc = lazy_dataset(run, [acc_uri]).to_table(columns=["radius"])
            radii = sorted(set(acc.column("radius").to_pylist())) or None
        # A scratch connection keeps its temp tables away from the user's session, where
        # they would be writable.
        scratch = duckdb.connect(":memory:")
        try:
            if run.is_s3:
                scratch.register_filesystem(run.fs)
            certificates, accuracy, _ = agg.build_tables(scratch, files, alpha=alpha, radii=radii)
        finally:
            scratch.close()
        con.register("certificates", certificates)
        con.register("accuracy", accuracy)
        names += ["certificates", "accuracy"]
    elif have_tables:
        con.register("certificates", lazy_dataset(run, [cert_uri]))
        con.register("accuracy", lazy_dataset(run, [acc_uri]))
        names += ["certificates", "accuracy"]
    return names


def connect(run: RunDir | str) -> duckdb.DuckDBPyConnection:
    """The read-only connection on a certification OUT with its views (and ``errors``)."""
    return _connect(run, [register])
