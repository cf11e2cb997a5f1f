"""The ``errors`` table: images quarantined under ``on_bad_input: quarantine``.

``OUT/errors/sigma=<s>/method=<m>/shard=<id>.parquet`` (:func:`tasks.common.layout.errors_uri`,
:data:`tasks.common.layout.ERRORS_SCHEMA`), one row per image of the shard that could not be certified
(corrupt or unreadable file, wrong size, NaN/Inf model output), published by
:func:`publish_shard_errors` before the shard's vote file. Quarantined images are not
certified: the aggregate expects planned minus quarantined images, the report lists them,
``densepure sql`` has a view ``errors``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common import storage
from tasks.common.layout import ERRORS_SCHEMA, error_files

__all__ = ["publish_shard_errors", "read_errors", "quarantined_counts"]


def publish_shard_errors(uri: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Make ``uri`` hold exactly this computation's quarantined images of one shard.

    With rows, the file is (re)written atomically; without, a file an earlier computation of
    the shard left is deleted (a single atomic delete), so an image that was fixed is no longer
    reported or subtracted from the expected images. Call it *before* publishing the shard's
    vote file: a process killed in between leaves a shard without votes, which the rerun
    recomputes, never a complete shard with a stale errors file.
    """
    if rows:
        storage.write_parquet_atomic(uri, pa.Table.from_pylist(list(rows), schema=ERRORS_SCHEMA))
    else:
        storage.remove(uri)


def read_errors(out: str) -> pa.Table:
    """Every quarantined image of OUT (an empty table if none)."""
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(u)), schema=ERRORS_SCHEMA)
              for u in error_files(out)]
    return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()


def quarantined_counts(out: str) -> dict[tuple[float, str], int]:
    """{(sigma, method): number of quarantined images}."""
    counts: dict[tuple[float, str], int] = {}
    for row in read_errors(out).select(["sigma", "method"]).to_pylist():
        key = (float(row["sigma"]), row["method"])
        counts[key] = counts.get(key, 0) + 1
    return counts
