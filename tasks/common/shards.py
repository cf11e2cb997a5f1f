"""Shard files of both jobs: whether a shard is complete, and clean-up after a killed writer.

A shard's rows (votes or attack rows) and its quarantined images are written whole and
atomically under their final names (``tasks.common.storage``), so a shard is either complete for its
config or recomputed; nothing here depends on what the rows hold beyond ``config_hash`` and
``image_id``.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common.run_dir import RunDir

__all__ = ["shard_state", "read_ids", "remove_stale_temporaries"]


def read_ids(run: RunDir, uri: str, config_hash: str) -> tuple[list[str] | None, str]:
    """Image ids of a shard-level file written for ``config_hash``, or (None, why not)."""
    try:
        table = pq.read_table(pa.BufferReader(run.read_bytes(uri)), columns=["config_hash", "image_id"])
    except FileNotFoundError:
        return None, "missing"
    except Exception as exc:  # truncated or corrupt Parquet, unreadable object
        return None, f"unreadable ({type(exc).__name__})"
    hashes = set(table.column("config_hash").to_pylist())
    if hashes and hashes != {config_hash}:
        return None, f"written by another config ({sorted(hashes)})"
    return table.column("image_id").to_pylist(), ""


def shard_state(task: Any) -> tuple[bool, str, int]:
    """(complete, reason, quarantined images) of a shard task.

    ``task`` has ``run`` (its :class:`RunDir`), ``uri`` (the shard's rows), ``errors_uri`` (its
    quarantined images), ``config_hash`` and ``records`` (the planned images): a vote or an attack
    shard. It is
    complete when its rows and quarantined images are exactly the planned images, written by
    this config; a missing file is (False, "", 0), a truncated or foreign one (False, why, 0).
    """
    if not task.run.exists(task.uri):
        return False, "", 0
    ids, why = read_ids(task.run, task.uri, task.config_hash)
    if ids is None:
        return False, why, 0
    quarantined: list[str] = []
    if len(ids) < len(task.records):  # the rest may have been quarantined
        quarantined, why = read_ids(task.run, task.errors_uri, task.config_hash)
        quarantined = quarantined or []
    got = ids + quarantined
    if sorted(got) != sorted(r.image_id for r in task.records) or len(got) != len(task.records):
        return False, f"holds {len(ids)} rows (+{len(quarantined)} quarantined), expected {len(task.records)} images", 0
    return True, "", len(quarantined)


def remove_stale_temporaries(run: RunDir) -> int:
    """Delete the hidden ``.name.tmp-*`` files a killed writer left under a local OUT.

    Safe because one certify runs per OUT at a time (the plan refuses a different config, and
    two copies of the same config would write identical files). S3 never has temporaries.
    """
    if run.is_s3 or not os.path.isdir(run.root):
        return 0
    removed = 0
    for dirpath, _, names in os.walk(run.root):
        for name in names:
            if name.startswith(".") and ".tmp-" in name:
                os.unlink(os.path.join(dirpath, name))
                removed += 1
    return removed


