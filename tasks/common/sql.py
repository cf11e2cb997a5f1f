"""The read-only DuckDB connection on a run's results: every job's views go through it.

:func:`connect` opens an in-memory DuckDB, registers the statistics UDFs of
:mod:`tasks.common.sqlfuncs`, lets each job's ``views`` module register its views (lazy scans of the
stored Parquet, see :func:`lazy_dataset`), adds ``errors`` (the quarantined images, one schema for
every job), then locks the connection.

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

from collections.abc import Callable, Sequence

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from tasks.common import layout
from tasks.common.run_dir import RunDir
from tasks.common.sqlfuncs import register_udfs

__all__ = ["QueryError", "Views", "connect", "lazy_dataset", "has_view"]


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

#: A job's view registration: ``(con, run, alpha) -> names registered``. It raises
#: :class:`QueryError` where ``alpha`` asks for something its OUT cannot give.
Views = Callable[[duckdb.DuckDBPyConnection, RunDir, "float | None"], list[str]]


def lazy_dataset(run: RunDir, uris: Sequence[str], schema: pa.Schema | None = None) -> pads.Dataset:
    """A lazy Arrow dataset over Parquet files of ``run``: DuckDB scans it through pyarrow, not
    through its own file system, so it keeps working after external access is switched off."""
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(run.fs)) if run.is_s3 else pafs.LocalFileSystem()
    paths = [u[len("s3://"):] if run.is_s3 else u for u in uris]
    return pads.dataset(paths, filesystem=arrow_fs, format="parquet", schema=schema)


def has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the connection has a view (or registered table) called ``name``."""
    return bool(con.sql(f"SELECT count(*) FROM duckdb_views() WHERE view_name = '{name}'").fetchall()[0][0])


def connect(run: RunDir | str, views: Sequence[Views], *, alpha: float | None = None) -> duckdb.DuckDBPyConnection:
    """A locked, read-only DuckDB connection on the results of OUT with the given jobs' views.

    Args:
        run: the OUT (a :class:`RunDir`, or its root: a local path or ``s3://bucket/prefix``,
            S3 settings from the environment, see tasks/common/storage.py).
        views: the view registrations to apply (each job's ``views.register``).
        alpha: passed to each registration (re-certification at that alpha; None: as published).

    Returns:
        The locked connection; close it when done.

    Raises:
        QueryError: there is nothing to query under OUT, or a registration refused ``alpha``.
    """
    run = RunDir.of(run)  # one file system (one S3 session) for every read below
    con = duckdb.connect(":memory:")
    try:
        register_udfs(con)
        names = []
        for register in views:
            names += register(con, run, alpha)
        errors = run.error_files() + run.attack_error_files()
        if errors:
            con.register("errors", lazy_dataset(run, errors, layout.ERRORS_SCHEMA))
        if not names:
            raise QueryError(f"nothing to query under {run}: no vote files, no attack rows, no training metrics "
                             "and no tables/certificates.parquet; check the path or run the pipeline")
        for statement in _LOCKDOWN:
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con
