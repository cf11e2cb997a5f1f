"""DuckDB over a run's results: vectorized statistics UDFs and a read-only SQL connection.

DuckDB has no inverse-Beta, inverse-normal or exact binomial test, so :func:`register_udfs`
adds them as Arrow UDFs backed by ``densepure_core.stats`` (scipy.special underneath). Each
UDF is called once per DuckDB vector (2,048 rows) with whole Arrow arrays, never per row.

:func:`connect` opens the results of one OUT (a local path or ``s3://``) for ad-hoc SQL:

- ``votes``: every vote shard (a lazy scan of the Parquet files, docs/schema.md);
- ``certificates`` and ``accuracy``: the published tables, or, with ``alpha=...``, tables
  re-certified from the stored counts at that alpha (no GPU, nothing written).

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

import csv
import datetime as _dt
import decimal
import io
import json
import math
import posixpath
from collections.abc import Sequence
from typing import Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from scipy import special

from densepure_core import stats

from . import storage
from .errors import ERRORS_SCHEMA, error_files

__all__ = [
    "UDFS", "FORMATS", "QueryError", "register_udfs", "connect", "run_query", "format_rows",
    "text_table",
]

FORMATS = ("table", "csv", "json")


class QueryError(ValueError):
    """A query on a results connection failed; the message says why and what to try."""


# ------------------------------------------------------------------------------------------
# UDFs
# ------------------------------------------------------------------------------------------

def _np(a: pa.ChunkedArray | pa.Array) -> np.ndarray:
    # DuckDB's default null handling never passes NULLs (NULL in -> NULL out), so the
    # conversion is exact.
    return a.to_numpy()


def _cp_lower(n_a, n, alpha):
    return pa.array(stats.clopper_pearson_lower(_np(n_a), _np(n), _np(alpha)), pa.float64())


def _norm_ppf(p):
    return pa.array(special.ndtri(_np(p).astype(np.float64)), pa.float64())


def _smoothing_radius(sigma, p_a_lower):
    return pa.array(stats.certified_radius(_np(sigma), _np(p_a_lower)), pa.float64())


def _binom_pvalue(c1, c2):
    return pa.array(stats.binomial_test_pvalue(_np(c1), _np(c2)), pa.float64())


UDFS: dict[str, tuple[Any, list[str], str, str]] = {
    "cp_lower": (_cp_lower, ["BIGINT", "BIGINT", "DOUBLE"], "DOUBLE",
                 "cp_lower(n_a, n, alpha): one-sided (1 - alpha) Clopper-Pearson lower bound "
                 "of n_a / n (0 when n_a = 0)"),
    "norm_ppf": (_norm_ppf, ["DOUBLE"], "DOUBLE",
                 "norm_ppf(p): the standard normal quantile Phi^-1(p) (scipy.special.ndtri)"),
    "smoothing_radius": (_smoothing_radius, ["DOUBLE", "DOUBLE"], "DOUBLE",
                         "smoothing_radius(sigma, p_a_lower): sigma * Phi^-1(p_a_lower), "
                         "0 below 0.5"),
    "binom_pvalue": (_binom_pvalue, ["BIGINT", "BIGINT"], "DOUBLE",
                     "binom_pvalue(c1, c2): two-sided exact binomial test of c1 successes in "
                     "c1 + c2 trials at p = 0.5 (scipy.stats.binomtest)"),
}
"""name -> (function, parameter types, return type, one-line description)."""


def register_udfs(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Register the statistics UDFs of :data:`UDFS` on ``con`` (idempotent).

    All are vectorized Arrow UDFs without side effects (DuckDB may cache and reorder them);
    NULL in any argument gives NULL. Out-of-range input (n_a > n, alpha outside (0, 1),
    negative counts, p outside [0, 1] for the radius) raises the ``ValueError`` of
    ``densepure_core.stats`` through DuckDB, naming the argument.

    Args:
        con: the connection.

    Returns:
        ``con``, for chaining.
    """
    have = {r[0] for r in con.sql(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'scalar'"
    ).fetchall()}
    for name, (fn, params, ret, _doc) in UDFS.items():
        if name not in have:
            con.create_function(name, fn, params, ret, type="arrow", side_effects=False)
    return con


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
    (docs/schema.md). With ``alpha`` the two tables are recomputed from the stored counts at
    that alpha, on the radius grid of the published accuracy table (or the default grid),
    after the same checks as the aggregate stage, except the expected-image count; nothing is
    written. Without ``alpha`` they are the published ``OUT/tables/*.parquet``; when those do
    not exist yet, only ``votes`` is there. The UDFs of :func:`register_udfs` are available.

    Read-only: DuckDB's file access is off and the configuration locked, so COPY ... TO,
    EXPORT DATABASE, ATTACH, INSTALL/LOAD and read_*() fail with a permission error, and
    INSERT/UPDATE/DELETE on the views fail; temporary tables a session creates live in memory
    only. Close the connection when done.

    Args:
        out: the OUT root, a local path or ``s3://bucket/prefix`` (S3 settings from the
            environment, see tasks/storage.py).
        alpha: re-certify at this one-sided error level in (0, 1); None: the published tables.

    Returns:
        The locked connection.

    Raises:
        QueryError: there is nothing to query (no votes and no tables), or ``alpha`` was given
            but there are no votes.
        tasks.aggregate.AggregateError: with ``alpha``, the votes fail the aggregate checks.
    """
    # Imported here because tasks.aggregate imports this module (for register_udfs).
    from . import aggregate as agg

    if alpha is not None:
        alpha = agg._check_alpha(alpha)
    s3 = storage.is_s3(out)
    fs, _ = storage.split_uri(out)  # one filesystem (one S3 session) for every read below
    files = agg.vote_files(out)
    cert_uri = agg.tables_uri(out, "certificates.parquet")
    acc_uri = agg.tables_uri(out, "accuracy.parquet")
    # One listing instead of one existence check per table: each is a round trip on S3.
    published = {posixpath.basename(u)
                 for u in storage.list_files(storage.join(out, "tables"), ".parquet")}
    have_tables = {"certificates.parquet", "accuracy.parquet"} <= published
    if alpha is not None and not files:
        raise QueryError(f"alpha={alpha!r} re-certifies from the votes, but there are no vote "
                         f"files under {storage.join(out, 'votes')}: check the OUT path")
    if not files and not have_tables:
        raise QueryError(f"nothing to query under {out}: no vote files and no "
                         "tables/certificates.parquet; check the path or run the pipeline")

    con = duckdb.connect(":memory:")
    try:
        register_udfs(con)
        if files:
            con.register("votes", _dataset(files, fs, s3, agg.VOTES_SCHEMA))
        errors = error_files(out)
        if errors:
            con.register("errors", _dataset(errors, fs, s3, ERRORS_SCHEMA))
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
                        "aggregate stage, or pass --alpha to certify from the votes.")
            raise QueryError(f"query failed: {text}{hint}") from None
    finally:
        con.close()
    return format_rows(columns, rows, fmt)


# ------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------

def format_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table") -> str:
    """Format query results as an aligned text table, CSV or JSON.

    - ``table``: columns separated by two spaces, a dashed rule under the header, numbers
      right-aligned, floats with 6 significant digits, NULL as ``NULL``, then ``(N rows)``.
    - ``csv``: a header line, then rows; floats in full precision (``repr``), NULL empty,
      booleans ``true``/``false``.
    - ``json``: an array of objects (one per row, keys in column order), indent 2; floats in
      full precision, NaN/inf as null, timestamps in ISO 8601.

    Args:
        columns: column names.
        rows: row tuples.
        fmt: one of :data:`FORMATS`.

    Returns:
        The text, without a trailing newline.
    """
    if fmt == "table":
        return text_table(columns, rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(v) for v in row])
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        records = [{c: _json_value(v) for c, v in zip(columns, row)} for row in rows]
        return json.dumps(records, indent=2, ensure_ascii=False, allow_nan=False)
    raise QueryError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool)


def _text_cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    return str(v)


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, footer: bool = True,
               align: str | None = None) -> str:
    """An aligned plain-text table (the ``table`` format of :func:`format_rows`).

    Args:
        columns: column names.
        rows: row tuples; numbers are right-aligned, floats shown with 6 significant digits,
            None as ``NULL``, strings used as they are.
        footer: end with a ``(N rows)`` line.
        align: one letter per column, ``l`` or ``r``; default: right for columns holding only
            numbers (and NULLs), left otherwise.

    Returns:
        The lines joined by newlines, without a trailing newline or trailing spaces.
    """
    cells = [[_text_cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    # A column is right-aligned when every non-NULL value in it is a number.
    if align is not None:
        if len(align) != len(columns) or set(align) - {"l", "r"}:
            raise ValueError(f"align must be one 'l' or 'r' per column ({len(columns)}), "
                             f"got {align!r}")
        right = [a == "r" for a in align]
    else:
        right = [bool(rows) and all(_is_number(r[i]) or r[i] is None for r in rows)
                 for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    if footer:
        out.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(out)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    return str(v)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    return v
