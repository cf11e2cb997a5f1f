"""``densepure sql``: ad-hoc SQL on the results of one or many runs, over every job's views.

:func:`connect` opens the read-only connection of :mod:`tasks.common.sql` on one OUT, several
OUTs, or run stores (local paths or ``s3://`` prefixes), with the views of all three jobs over every
run found (rows carry ``run_id``; ``runs`` has one row per run):

- certification (:mod:`tasks.certify.views`): ``votes``, ``certificates`` and ``accuracy`` (the
  published tables, or, with ``alpha=...``, tables re-certified from the stored counts at that
  alpha: no GPU, nothing written);
- attack evaluation (:mod:`tasks.attack.views`): ``attacks``, ``attack_summary``;
- ADDT training (:mod:`tasks.train_addt.views`): ``train_metrics``;
- ``errors``: the quarantined images, when there are any;
- ``runs``: one row per run (job, name, config hash, model fingerprints, dataset, start and end,
  status, images, the published alpha: :func:`tasks.common.sql.runs_table`).

The statistics UDFs of :mod:`tasks.common.sqlfuncs` are registered on it. It is read-only: see
:mod:`tasks.common.sql`.

Example::

    sql = "SELECT sigma, method, count(*) AS images FROM certificates GROUP BY ALL"
    print(run_query("results/run1", sql))
    print(run_query(["results/store"], "SELECT run_id, status FROM runs ORDER BY started_at"))
"""

from __future__ import annotations

import re

import duckdb

from tasks.attack import views as attack_views
from tasks.certify import views as certify_views
from tasks.common.run_dir import RunDir
from tasks.common.run_index import RunIndexError, index_runs
from tasks.common.sql import QueryError
from tasks.common.sql import connect as _connect
from tasks.common.textfmt import FORMATS, format_rows
from tasks.train_addt import views as train_views

__all__ = ["QueryError", "RunIndexError", "connect", "run_query"]

#: Every job's views, in the order they are registered.
ALL_VIEWS = (certify_views.register, attack_views.register, train_views.register)


def connect(locations: "str | RunDir | list[str]", *, alpha: float | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection on every run under ``locations``, with every job's views.

    Args:
        locations: one or more OUTs or run stores (local paths or ``s3://`` prefixes).
        alpha: re-certify at this one-sided error level in (0, 1); None: the published tables.

    Returns:
        The locked connection (close it when done).

    Raises:
        RunIndexError: a location holds no run.
        QueryError: there is nothing to query (no votes, attack rows, metrics or tables), or
            ``alpha`` was given but there are no votes.
        tasks.certify.aggregate_checks.AggregateError: with ``alpha``, the votes fail the aggregate checks.
    """
    if not isinstance(locations, list):
        locations = [RunDir.of(locations).root]
    return _connect(index_runs(locations), ALL_VIEWS, alpha=alpha)


def run_query(locations: "str | RunDir | list[str]", sql: str, *, alpha: float | None = None,
              fmt: str = "table") -> str:
    """Run ``sql`` on :func:`connect` ``(locations, alpha=alpha)`` and format the last result.

    Args:
        locations: one or more OUTs or run stores (local or ``s3://``).
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
    con = connect(locations, alpha=alpha)
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
            missing = re.search(r"Table with name (\w+) does not exist", text)
            if missing:
                # DuckDB suggests its own catalog ("Did you mean pg_views?"): name the views this
                # OUT has instead.
                text = text.split("!")[0] + "."
                views = [r[0] for r in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal "
                                               "ORDER BY view_name").fetchall()]
                hint = f"\nThe runs given have the views: {', '.join(views)}."
                if missing.group(1) in ("certificates", "accuracy"):
                    hint += (" The certificates/accuracy tables are not published yet: run the "
                             "aggregate stage (rerun `densepure certify` with the same config and "
                             "--out: it votes only what is missing, then publishes them), or pass "
                             "--alpha to certify from the votes.")
            raise QueryError(f"query failed: {text}{hint}") from None
    finally:
        con.close()
    return format_rows(columns, rows, fmt)
