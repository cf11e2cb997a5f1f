"""The certification job's SQL views, over every run given: ``votes``, ``certificates``, ``accuracy``.

- ``votes``: every vote shard, a lazy scan of the Parquet files (docs/schema.md);
- ``certificates`` and ``accuracy``: the published ``OUT/tables/*.parquet`` of each run, or, with
  ``alpha=...``, tables re-certified from each run's stored counts at that alpha (no GPU, nothing
  written), on the radius grid of its published accuracy table (or the default grid), after the
  same checks as the aggregate stage except the expected-image count. Runs without published
  tables contribute their votes only.

Rows carry ``run_id``: a query over a store groups or filters by run.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from tasks.certify import aggregate as agg
from tasks.certify.aggregate_sql import check_alpha
from tasks.common import layout
from tasks.common.run_dir import RunDir
from tasks.common.run_index import RunFiles
from tasks.common.sql import QueryError, lazy_dataset
from tasks.common.sql import connect as _connect

__all__ = ["register", "connect"]


def _published(r: RunFiles) -> tuple[str, str] | None:
    cert, acc = r.run.tables_uri("certificates.parquet"), r.run.tables_uri("accuracy.parquet")
    return (cert, acc) if {cert, acc} <= set(r.of("tables")) else None


def register(con: duckdb.DuckDBPyConnection, runs: list[RunFiles], alpha: float | None) -> list[str]:
    """Register the certification views of ``runs`` on ``con`` (see the module docstring).

    Raises:
        QueryError: ``alpha`` was given but there are no votes.
        tasks.certify.aggregate_checks.AggregateError: with ``alpha``, the votes fail the aggregate checks.
    """
    if alpha is not None:
        alpha = check_alpha(alpha)
    voted = [r for r in runs if r.of("votes")]
    files = [u for r in voted for u in r.of("votes")]
    if alpha is not None and not files:
        raise QueryError(f"alpha={alpha!r} re-certifies from the votes, but there are no vote "
                         f"files under {', '.join(str(r.run.votes_dir) for r in runs[:3])}: check the OUT path")
    names = []
    if not files and not any(_published(r) for r in runs):
        return names
    fs_run = runs[0].run
    if files:
        con.register("votes", lazy_dataset(fs_run, files, layout.VOTES_SCHEMA))
        names.append("votes")
    if alpha is not None:
        certificates, accuracy = [], []
        for r in voted:  # each run on its own: a partition's votes belong to one run
            radii = None
            published = _published(r)
            if published:  # keep the published grid, so the two tables compare row by row
                acc = lazy_dataset(r.run, [published[1]]).to_table(columns=["radius"])
                radii = sorted(set(acc.column("radius").to_pylist())) or None
            # A scratch connection keeps its temp tables away from the user's session, where
            # they would be writable.
            scratch = duckdb.connect(":memory:")
            try:
                if r.run.is_s3:
                    scratch.register_filesystem(r.run.fs)
                c, a, _ = agg.build_tables(scratch, r.of("votes"), alpha=alpha, radii=radii)
            finally:
                scratch.close()
            certificates.append(c)
            accuracy.append(a)
        con.register("certificates", pa.concat_tables(certificates))
        con.register("accuracy", pa.concat_tables(accuracy))
        names += ["certificates", "accuracy"]
    else:
        published = [p for r in runs if (p := _published(r))]
        if published:
            con.register("certificates", lazy_dataset(fs_run, [c for c, _ in published]))
            con.register("accuracy", lazy_dataset(fs_run, [a for _, a in published]))
            names += ["certificates", "accuracy"]
    return names


def connect(run: RunDir | str) -> duckdb.DuckDBPyConnection:
    """The read-only connection on a certification OUT with its views (and ``errors``)."""
    return _connect(run, [register])
