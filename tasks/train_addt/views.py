"""The ADDT training job's SQL view: ``train_metrics`` (one row per optimisation step)."""

from __future__ import annotations

import duckdb

from tasks.common import layout
from tasks.common.run_dir import RunDir
from tasks.common.run_index import RunFiles
from tasks.common.sql import connect as _connect
from tasks.common.sql import lazy_dataset

__all__ = ["register", "connect"]


def register(con: duckdb.DuckDBPyConnection, runs: list[RunFiles], alpha: float | None) -> list[str]:
    """Register the view(s) of ``runs`` on ``con``; ``alpha`` concerns certification only."""
    rows = [u for r in runs for u in r.of("metrics")]
    if not rows:
        return []
    con.register("train_metrics", lazy_dataset(runs[0].run, rows, layout.TRAIN_METRICS_SCHEMA))
    return ["train_metrics"]


def connect(run: RunDir | str) -> duckdb.DuckDBPyConnection:
    """The read-only connection on a training OUT with its view."""
    return _connect(run, [register])
