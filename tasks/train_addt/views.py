"""The ADDT training job's SQL view: ``train_metrics`` (one row per optimisation step)."""

from __future__ import annotations

import duckdb

from tasks.common import layout
from tasks.common.run_dir import RunDir
from tasks.common.sql import connect as _connect
from tasks.common.sql import lazy_dataset

__all__ = ["register", "connect"]


def register(con: duckdb.DuckDBPyConnection, run: RunDir, alpha: float | None) -> list[str]:
    """Register the training view of OUT on ``con``; ``alpha`` concerns certification only."""
    rows = run.metrics_files()
    if not rows:
        return []
    con.register("train_metrics", lazy_dataset(run, rows, layout.TRAIN_METRICS_SCHEMA))
    return ["train_metrics"]


def connect(run: RunDir | str) -> duckdb.DuckDBPyConnection:
    """The read-only connection on a training OUT with its view."""
    return _connect(run, [register])
