"""The read-only DuckDB connection on the results of one or many runs: every job's views go through it.

:func:`connect` opens an in-memory DuckDB on the runs found under one or more locations (OUTs or
run stores, :func:`tasks.common.run_index.index_runs`), registers the statistics UDFs of
:mod:`tasks.common.sqlfuncs`, lets each job's ``views`` module register its views over all the
runs (lazy scans of the stored Parquet, see :func:`lazy_dataset`; every row carries its
``run_id``), adds ``errors`` (the quarantined images, one schema for every job) and ``runs`` (one
row per run: :func:`runs_table`), then locks the connection.

The connection is read-only for SQL: the tables are Arrow views (INSERT/UPDATE/DELETE fail),
and DuckDB's file access is switched off and the configuration locked *after* the data is
attached, so COPY ... TO, EXPORT DATABASE, ATTACH, INSTALL/LOAD and read_*() of other files
all fail with a permission error, and no statement can switch it back on. Nothing under OUT
can change through it.

Imports :mod:`tasks.common` only: the views of each job live in that job's package
(``tasks.certify.views``, ``tasks.attack.views``, ``tasks.train_addt.views``), and
:mod:`tasks.query` puts them together for ``densepure sql``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from tasks.common import layout
from tasks.common.run_dir import RunDir
from tasks.common.run_index import RunFiles, index_runs
from tasks.common.sqlfuncs import register_udfs

__all__ = ["QueryError", "Views", "connect", "lazy_dataset", "has_view", "runs_table", "RUNS_SCHEMA"]


class QueryError(ValueError):
    """A query on a results connection failed; the message says why and what to try."""


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

#: A job's view registration: ``(con, runs, alpha) -> names registered``, each view spanning
#: every run given (rows carry ``run_id``). It raises :class:`QueryError` where ``alpha`` asks for
#: something the runs cannot give.
Views = Callable[[duckdb.DuckDBPyConnection, "list[RunFiles]", "float | None"], list[str]]


def lazy_dataset(run: RunDir, uris: Sequence[str], schema: pa.Schema | None = None) -> pads.Dataset:
    """A lazy Arrow dataset over Parquet files of ``run``: DuckDB scans it through pyarrow, not
    through its own file system, so it keeps working after external access is switched off."""
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(run.fs)) if run.is_s3 else pafs.LocalFileSystem()
    paths = [u[len("s3://"):] if run.is_s3 else u for u in uris]
    return pads.dataset(paths, filesystem=arrow_fs, format="parquet", schema=schema)


def has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the connection has a view (or registered table) called ``name``."""
    return bool(con.sql(f"SELECT count(*) FROM duckdb_views() WHERE view_name = '{name}'").fetchall()[0][0])


def connect(runs: "list[RunFiles] | RunDir | str", views: Sequence[Views], *,
            alpha: float | None = None) -> duckdb.DuckDBPyConnection:
    """A locked, read-only DuckDB connection on the results of one or more runs, with the given
    jobs' views over all of them and ``runs`` (one row per run, :func:`runs_table`).

    Args:
        runs: the runs (:func:`tasks.common.run_index.index_runs`), or one location (an OUT or a
            store; a local path or ``s3://bucket/prefix``, S3 settings from the environment).
        views: the view registrations to apply (each job's ``views.register``).
        alpha: passed to each registration (re-certification at that alpha; None: as published).

    Returns:
        The locked connection; close it when done.

    Raises:
        QueryError: there is nothing to query, or a registration refused ``alpha``.
    """
    if not isinstance(runs, list):
        runs = index_runs([RunDir.of(runs).root])
    if len({r.run.is_s3 for r in runs}) > 1:
        raise QueryError("one query reads either local runs or runs on S3, not both: copy them to one place")
    con = duckdb.connect(":memory:")
    try:
        register_udfs(con)
        names = []
        for register in views:
            names += register(con, runs, alpha)
        errors = [u for r in runs for u in r.of("errors") + r.of("attack_errors")]
        if errors:
            con.register("errors", lazy_dataset(runs[0].run, errors, layout.ERRORS_SCHEMA))
        if not names:
            where = ", ".join(str(r.run) for r in runs[:3]) + (" ..." if len(runs) > 3 else "")
            raise QueryError(f"nothing to query under {where}: no vote files, no attack rows, no training metrics "
                             "and no tables/certificates.parquet; check the path or run the pipeline")
        con.register("runs", runs_table(runs))
        for statement in _LOCKDOWN:
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con


#: One row per run (the ``runs`` view): what a user asks of a store before anything else.
RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("job", pa.string()), ("run_name", pa.string()), ("out", pa.string()),
    ("config_hash", pa.string()), ("model_fingerprints", pa.string()), ("dataset", pa.string()),
    ("started_at", pa.timestamp("us", tz="UTC")), ("ended_at", pa.timestamp("us", tz="UTC")),
    ("status", pa.string()), ("error", pa.string()), ("images", pa.int64()), ("alpha", pa.float64()),
])


def _time(value) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def runs_table(runs: "list[RunFiles]") -> pa.Table:
    """:data:`RUNS_SCHEMA` rows of ``runs`` (docs/schema.md): JSON text for the fingerprints and the
    dataset section, the published alpha (certification; NULL for other jobs)."""
    rows = []
    for r in runs:
        meta = r.meta or {}
        tables = meta.get("tables") or {}
        alpha = tables.get("alpha", r.config.get("alpha")) if r.job == "certify" else None
        rows.append({
            "run_id": meta.get("run_id"), "job": r.job, "run_name": r.config.get("run_name"), "out": r.run.root,
            "config_hash": meta.get("config_hash"),
            "model_fingerprints": json.dumps(meta.get("model_fingerprints") or {}, sort_keys=True),
            "dataset": json.dumps(r.config.get("dataset") or {}, sort_keys=True),
            "started_at": _time(meta.get("created_at")),
            "ended_at": _time(meta.get("ended_at") or meta.get("finished_at")),
            "status": r.status, "error": meta.get("error"), "images": meta.get("images"), "alpha": alpha,
        })
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)
