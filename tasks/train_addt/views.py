"""The ADDT training job's SQL view: ``train_metrics`` (one row per optimisation step)."""

from __future__ import annotations

import duckdb
import fsspec

from tasks.common import layout, storage
from tasks.common.sql import connect as _connect
from tasks.common.sql import lazy_dataset

__all__ = ["register", "connect"]


def register(con: duckdb.DuckDBPyConnection, out: str, fs: fsspec.AbstractFileSystem,
             alpha: float | None) -> list[str]:
    """Register the training view of OUT on ``con``; ``alpha`` concerns certification only."""
    rows = layout.metrics_files(out)
    if not rows:
        return []
    con.register("train_metrics", lazy_dataset(rows, fs, storage.is_s3(out), layout.TRAIN_METRICS_SCHEMA))
    return ["train_metrics"]


def connect(out: str) -> duckdb.DuckDBPyConnection:
    """The read-only connection on a training OUT with its view."""
    return _connect(out, [register])
