"""The attack evaluation's SQL views: ``attacks`` (every attack shard, a lazy scan) and
``attack_summary`` (robust accuracy per defense, threat, attack and scoring rule with Wilson
intervals: :data:`tasks.attack.summary_sql.SUMMARY_SQL`)."""

from __future__ import annotations

import duckdb

from tasks.attack.summary_sql import SUMMARY_SQL
from tasks.common import layout
from tasks.common.run_dir import RunDir
from tasks.common.run_index import RunFiles
from tasks.common.sql import connect as _connect
from tasks.common.sql import lazy_dataset

__all__ = ["register", "connect"]


def register(con: duckdb.DuckDBPyConnection, runs: list[RunFiles], alpha: float | None) -> list[str]:
    """Register the view(s) of ``runs`` on ``con``; ``alpha`` concerns certification only."""
    rows = [u for r in runs for u in r.of("attacks")]
    if not rows:
        return []
    con.register("attacks", lazy_dataset(runs[0].run, rows, layout.ATTACKS_SCHEMA))
    con.execute(f"CREATE VIEW attack_summary AS {SUMMARY_SQL}")
    return ["attacks", "attack_summary"]


def connect(run: RunDir | str) -> duckdb.DuckDBPyConnection:
    """The read-only connection on an attack OUT with its views (and ``errors``)."""
    return _connect(run, [register])
