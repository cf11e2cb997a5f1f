"""A read-only DuckDB connection on a run's results, and ad-hoc SQL over it.

:func:`connect` opens the results of one OUT (a local path or ``s3://``) for ad-hoc SQL:

- ``votes``: every vote shard (a lazy scan of the Parquet files, docs/schema.md);
- ``errors``: the quarantined images, when there are any;
- ``certificates`` and ``accuracy``: the published tables, or, with ``alpha=...``, tables
  re-certified from the stored counts at that alpha (no GPU, nothing written).

The statistics UDFs of :mod:`tasks.common.sqlfuncs` are registered on it.

The connection is read-only for SQL: the tables are Arrow views (INSERT/UPDATE/DELETE fail),
and DuckDB's file access is switched off and the configuration locked *after* the data is
attached, so COPY ... TO, EXPORT DATABASE, ATTACH, INSTALL/LOAD and read_*() of other files
all fail with a permission error, and no statement can switch it back on. Nothing under OUT
can change through it.

Example::

    sql = "SELECT sigma, method, count(*) AS images FROM certificates GROUP BY ALL"
    print(run_query("results/run1", sql))
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from tasks.certify import aggregate as agg
from tasks.common import layout, storage
from tasks.attack.summary_sql import SUMMARY_SQL
from tasks.certify.aggregate_sql import check_alpha
from tasks.common.sqlfuncs import register_udfs
from tasks.common.textfmt import FORMATS, format_rows

__all__ = ["QueryError", "connect", "run_query"]


class QueryError(ValueError):
    """A query on a results connection failed; the message says why and what to try."""


# ------------------------------------------------------------------------------------------
# the read-only results connection
# ------------------------------------------------------------------------------------------

# Applied in this order once the data is attached. enable_external_access=false is what
# blocks every file/network access of SQL (COPY TO, EXPORT, ATTACH, read_*, INSTALL);
# lock_configuration=true makes it irreversible for this connection.
_LOCKDOWN = (
    "SET python_enable_replacements = false",  # no silent scans of the caller's DataFrames
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


def _dataset(uris: Sequence[str], fs: fsspec.AbstractFileSystem, s3: bool,
             schema: pa.Schema | None = None) -> pads.Dataset:
    """A lazy Arrow dataset over Parquet files: DuckDB scans it through pyarrow, not through its
    own file system, so it keeps working after external access is switched off."""
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs)) if s3 else pafs.LocalFileSystem()
    paths = [u[len("s3://"):] if s3 else u for u in uris]
    return pads.dataset(paths, filesystem=arrow_fs, format="parquet", schema=schema)


def connect(out: str, *, alpha: float | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection on the results of OUT.

    Views: ``votes`` (every vote shard, lazily scanned), ``certificates`` and ``accuracy``
    (docs/schema.md); for an attack OUT ``attacks`` (every attack shard) and
    ``attack_summary`` (tasks/attack/summary_sql.py); for an ADDT training OUT ``train_metrics`` (one row
    per step); ``errors`` (quarantined images of either job).
    With ``alpha`` the two tables are recomputed from the stored counts at that alpha, on
    the radius grid of the published accuracy table (or the default grid), after the same checks as the aggregate stage, except the expected-image count; nothing is
    written. Without ``alpha`` they are the published ``OUT/tables/*.parquet``; when those do
    not exist yet, only ``votes`` is there. The UDFs of :func:`register_udfs` are available.

    Read-only: DuckDB's file access is off and the configuration locked, so COPY ... TO,
    EXPORT DATABASE, ATTACH, INSTALL/LOAD and read_*() fail with a permission error, and
    INSERT/UPDATE/DELETE on the views fail; temporary tables a session creates live in memory
    only. Close the connection when done.

    Args:
        out: the OUT root, a local path or ``s3://bucket/prefix`` (S3 settings from the
            environment, see tasks/common/storage.py).
        alpha: re-certify at this one-sided error level in (0, 1); None: the published tables.

    Returns:
        The locked connection.

    Raises:
        QueryError: there is nothing to query (no votes and no tables), or ``alpha`` was given
            but there are no votes.
        tasks.certify.aggregate.AggregateError: with ``alpha``, the votes fail the aggregate checks.
    """
    if alpha is not None:
        alpha = check_alpha(alpha)
    s3 = storage.is_s3(out)
    fs, _ = storage.split_uri(out)  # one filesystem (one S3 session) for every read below
    files = layout.vote_files(out)
    cert_uri = layout.tables_uri(out, "certificates.parquet")
    acc_uri = layout.tables_uri(out, "accuracy.parquet")
    # One listing instead of one existence check per table: each is a round trip on S3.
    published = {posixpath.basename(u)
                 for u in storage.list_files(layout.tables_dir(out), ".parquet")}
    have_tables = {"certificates.parquet", "accuracy.parquet"} <= published
    if alpha is not None and not files:
        raise QueryError(f"alpha={alpha!r} re-certifies from the votes, but there are no vote "
                         f"files under {layout.votes_dir(out)}: check the OUT path")
    attack_rows = layout.attack_files(out)
    train_rows = layout.metrics_files(out)
    if not files and not have_tables and not attack_rows and not train_rows:
        raise QueryError(f"nothing to query under {out}: no vote files, no attack rows, no training metrics "
                         "and no tables/certificates.parquet; check the path or run the pipeline")

    con = duckdb.connect(":memory:")
    try:
        register_udfs(con)
        if files:
            con.register("votes", _dataset(files, fs, s3, layout.VOTES_SCHEMA))
        errors = layout.error_files(out) + layout.attack_error_files(out)
        if errors:
            con.register("errors", _dataset(errors, fs, s3, layout.ERRORS_SCHEMA))
        if attack_rows:
            con.register("attacks", _dataset(attack_rows, fs, s3, layout.ATTACKS_SCHEMA))
            con.execute(f"CREATE VIEW attack_summary AS {SUMMARY_SQL}")
        if train_rows:
            con.register("train_metrics", _dataset(train_rows, fs, s3, layout.TRAIN_METRICS_SCHEMA))
        if alpha is not None:
            radii = None
            if have_tables:  # keep the published grid, so the two tables compare row by row
                acc = _dataset([acc_uri], fs, s3).to_table(columns=["radius"])
                radii = sorted(set(acc.column("radius").to_pylist())) or None
            # A scratch connection keeps its temp tables away from the user's session, where
            # they would be writable.
            scratch = duckdb.connect(":memory:")
            try:
                if s3:
                    scratch.register_filesystem(fs)
                certificates, accuracy, _ = agg.build_tables(scratch, files, alpha=alpha,
                                                             radii=radii)
            finally:
                scratch.close()
            con.register("certificates", certificates)
            con.register("accuracy", accuracy)
        elif have_tables:
            con.register("certificates", _dataset([cert_uri], fs, s3))
            con.register("accuracy", _dataset([acc_uri], fs, s3))
        for statement in _LOCKDOWN:
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con


def run_query(out: str, sql: str, *, alpha: float | None = None, fmt: str = "table") -> str:
    """Run ``sql`` on :func:`connect` ``(out, alpha=alpha)`` and format the last result.

    Args:
        out: the OUT root (local or ``s3://``).
        sql: one or more SQL statements; the result of the last one is returned.
        alpha: re-certify at this alpha first (see :func:`connect`).
        fmt: ``"table"`` (aligned text), ``"csv"`` or ``"json"`` (see :func:`format_rows`).

    Returns:
        The formatted result, without a trailing newline ("" for a statement without rows).

    Raises:
        QueryError: the SQL failed (the message keeps DuckDB's and adds a hint), or ``fmt``
            is unknown.
    """
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    con = connect(out, alpha=alpha)
    try:
        try:
            con.execute(sql)
            if con.description is None:
                return ""
            columns = [d[0] for d in con.description]
            rows = con.fetchall()
        except duckdb.PermissionException as exc:
            raise QueryError(f"{exc}\nThis connection is read-only: results under OUT cannot be "
                             "written or other files read from SQL. Save a result with "
                             "--format csv (or json) and a shell redirect.") from None
        except duckdb.Error as exc:
            hint = ""
            text = str(exc)
            if "Catalog Error" in text and ("certificates" in text or "accuracy" in text):
                hint = ("\nThe certificates/accuracy tables are not published yet: run the "
                        "aggregate stage (rerun `densepure certify` with the same config and "
                        "--out: it votes only what is missing, then publishes them), or pass "
                        "--alpha to certify from the votes.")
            raise QueryError(f"query failed: {text}{hint}") from None
    finally:
        con.close()
    return format_rows(columns, rows, fmt)
