"""The ``errors`` table: images quarantined under ``on_bad_input: quarantine``.

``OUT/errors/sigma=<s>/method=<m>/shard=<id>.parquet``, one row per image that could not be
certified (corrupt or unreadable file, wrong size, NaN/Inf model output), written atomically
before the shard's vote file. Quarantined images are not certified: the aggregate expects
planned minus quarantined images, the report lists them, ``densepure sql`` has a view ``errors``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

__all__ = ["ERRORS_SCHEMA", "errors_uri", "error_files", "read_errors", "quarantined_counts"]

ERRORS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("config_hash", pa.string()), ("image_id", pa.string()), ("uri", pa.string()),
    ("label", pa.int32()), ("sigma", pa.float64()), ("method", pa.string()), ("shard", pa.int32()),
    ("error_type", pa.string()), ("error", pa.string()), ("worker", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])


def errors_uri(votes_uri: str, out: str) -> str:
    """The errors file that belongs to the vote shard ``votes_uri`` of ``out``."""
    return votes_uri.replace(storage.join(out, "votes"), storage.join(out, "errors"), 1)


def error_files(out: str) -> list[str]:
    return storage.list_files(storage.join(out, "errors"), ".parquet")


def read_errors(out: str) -> pa.Table:
    """Every quarantined image of OUT (an empty table if none)."""
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(u)), schema=ERRORS_SCHEMA) for u in error_files(out)]
    return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()


def quarantined_counts(out: str) -> dict[tuple[float, str], int]:
    """{(sigma, method): number of quarantined images}."""
    counts: dict[tuple[float, str], int] = {}
    for row in read_errors(out).select(["sigma", "method"]).to_pylist():
        key = (float(row["sigma"]), row["method"])
        counts[key] = counts.get(key, 0) + 1
    return counts
