"""The ``errors`` table: images quarantined under ``on_bad_input: quarantine``.

``OUT/errors/sigma=<s>/method=<m>/shard=<id>.parquet`` (:meth:`tasks.common.run_dir.RunDir.errors_uri`,
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

from tasks.common.layout import ERRORS_SCHEMA
from tasks.common.run_dir import RunDir

__all__ = ["publish_shard_errors", "read_errors", "quarantined_counts"]


def publish_shard_errors(run: RunDir, uri: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Make ``uri`` hold exactly this computation's quarantined images of one shard.

    With rows, the file is (re)written atomically; without, a file an earlier computation of
    the shard left is deleted (a single atomic delete), so an image that was fixed is no longer
    reported or subtracted from the expected images. Call it *before* publishing the shard's
    vote file: a process killed in between leaves a shard without votes, which the rerun
    recomputes, never a complete shard with a stale errors file.
    """
    if rows:
        run.write_parquet(uri, pa.Table.from_pylist(list(rows), schema=ERRORS_SCHEMA))
    else:
        run.remove(uri)


def read_errors(run: RunDir) -> pa.Table:
    """Every quarantined image of a certification OUT (an empty table if none)."""
    tables = [pq.read_table(pa.BufferReader(run.read_bytes(u)), schema=ERRORS_SCHEMA)
              for u in run.error_files()]
    return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()


def quarantined_counts(run: RunDir) -> dict[tuple[float, str], int]:
    """{(sigma, method): number of quarantined images}."""
    counts: dict[tuple[float, str], int] = {}
    for row in read_errors(run).select(["sigma", "method"]).to_pylist():
        key = (float(row["sigma"]), row["method"])
        counts[key] = counts.get(key, 0) + 1
    return counts
