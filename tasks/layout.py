"""The layout of OUT and the Parquet schemas of its files: the data contract (docs/schema.md).

Every stage takes paths and schemas from here and nowhere else, so the vote stage (which
writes the votes and errors files) and the aggregate stage (which reads them) never depend on
each other::

    OUT/
      config.yaml, manifest.parquet, run.json          the plan
      votes/sigma=<s>/method=<m>/shard=<id>.parquet    VOTES_SCHEMA, one row per image
      errors/sigma=<s>/method=<m>/shard=<id>.parquet   ERRORS_SCHEMA, quarantined images
      tables/certificates.parquet                      CERTIFICATES_SCHEMA
      tables/accuracy.parquet                          ACCURACY_SCHEMA
      tables/summary.json
      report.md, certified_accuracy.png
      tsv/sigma=<s>_method=<m>.tsv

``<s>`` is :func:`format_sigma` (``repr(float(sigma))``), ``<m>`` the method's name verbatim,
``<id>`` the shard number zero-padded to 5 digits.

Imports only :mod:`tasks.storage`: a leaf of the stage layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pyarrow as pa

from . import storage

__all__ = [
    "VOTES_SCHEMA", "CERTIFICATES_SCHEMA", "ACCURACY_SCHEMA", "ERRORS_SCHEMA", "LayoutError",
    "format_sigma", "shard_uri", "errors_uri", "tables_dir", "tables_uri", "votes_dir", "errors_dir",
    "parse_vote_path", "vote_files", "error_files", "tsv_name", "config_uri", "manifest_uri",
    "run_uri", "report_uri", "plot_uri", "tsv_dir", "names",
]

# ------------------------------------------------------------------------------------------
# schemas (docs/schema.md describes every column)
# ------------------------------------------------------------------------------------------

VOTES_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),  # -1: unknown
    pa.field("sigma", pa.float64(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("t_star", pa.int32(), nullable=False),
    pa.field("k", pa.int32(), nullable=False),
    pa.field("steps", pa.int32(), nullable=False),
    pa.field("n0", pa.int32(), nullable=False),
    pa.field("n", pa.int32(), nullable=False),
    pa.field("counts0", pa.list_(pa.int32()), nullable=False),  # dense, one entry per class
    pa.field("counts", pa.list_(pa.int32()), nullable=False),
    pa.field("unet_calls", pa.int64(), nullable=False),
    pa.field("classifier_calls", pa.int64(), nullable=False),
    pa.field("seconds", pa.float64(), nullable=False),
    pa.field("worker", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # sampling (docs/schema.md): fixed rows: n_used = n = n_max, bound "clopper-pearson", "{}";
    # adaptive rows: n_used = n <= n_max, the anytime bound ("staged", "betabin") and its JSON
    # parameters. Files written before these columns existed are read as fixed rows.
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("n_used", pa.int32(), nullable=False),
    pa.field("n_max", pa.int32(), nullable=False),
    pa.field("bound", pa.string(), nullable=False),
    pa.field("bound_params", pa.string(), nullable=False),
])
"""One row per image in ``OUT/votes/sigma=<s>/method=<m>/shard=<id>.parquet``."""

CERTIFICATES_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("image_id", pa.string()),
    ("sigma", pa.float64()),
    ("method", pa.string()),
    ("label", pa.int32()),
    ("prediction", pa.int32()),  # ABSTAIN = -1
    ("n_a", pa.int64()),
    ("n", pa.int64()),
    ("alpha", pa.float64()),
    ("p_a_lower", pa.float64()),
    ("radius", pa.float64()),
    ("correct", pa.bool_()),  # NULL where the label is unknown (-1)
    ("sampling", pa.string()),  # from the votes: "fixed" or "adaptive"
    ("bound", pa.string()),  # the bound p_a_lower is: "clopper-pearson", "staged", "betabin"
])
"""``OUT/tables/certificates.parquet``: CERTIFY per image, sorted by (sigma, method, image_id)."""

ACCURACY_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("sigma", pa.float64()),
    ("method", pa.string()),
    ("radius", pa.float64()),
    ("certified_accuracy", pa.float64()),  # NULL when no image of the partition has a label
    ("images", pa.int64()),  # the denominator: images with a known label
])
"""``OUT/tables/accuracy.parquet``: certified accuracy per (sigma, method) and radius."""

ERRORS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("config_hash", pa.string()), ("image_id", pa.string()),
    ("uri", pa.string()), ("label", pa.int32()), ("sigma", pa.float64()), ("method", pa.string()),
    ("shard", pa.int32()), ("error_type", pa.string()), ("error", pa.string()),
    ("worker", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")),
])
"""``OUT/errors/sigma=<s>/method=<m>/shard=<id>.parquet``: one row per quarantined image."""

# ------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------

_LIST_SHOWN = 10  # how many offending items an error message names before "... and N more"

# .../votes/sigma=<repr(float)>/method=<name>/shard=<digits>.parquet
_VOTE_PATH = re.compile(r"/votes/sigma=([^/]+)/method=([^/]+)/shard=(\d+)\.parquet$")


class LayoutError(ValueError):
    """A file under OUT is outside the layout of the data contract; the message says which."""


def format_sigma(sigma: float) -> str:
    """The ``<s>`` of every path: ``repr(float(sigma))`` (``0.25``, ``1.0``)."""
    return repr(float(sigma))


def _partition(root: str, sigma: float, method: str, shard: int) -> str:
    return storage.join(root, f"sigma={format_sigma(sigma)}", f"method={method}",
                        f"shard={int(shard):05d}.parquet")


def votes_dir(out: str) -> str:
    """``OUT/votes``."""
    return storage.join(out, "votes")


def errors_dir(out: str) -> str:
    """``OUT/errors``."""
    return storage.join(out, "errors")


def shard_uri(out: str, sigma: float, method: str, shard: int) -> str:
    """``OUT/votes/sigma=<s>/method=<m>/shard=<id>.parquet``: one shard's votes."""
    return _partition(votes_dir(out), sigma, method, shard)


def errors_uri(out: str, sigma: float, method: str, shard: int) -> str:
    """``OUT/errors/sigma=<s>/method=<m>/shard=<id>.parquet``: one shard's quarantined images."""
    return _partition(errors_dir(out), sigma, method, shard)


def tables_dir(out: str) -> str:
    """``OUT/tables``."""
    return storage.join(out, "tables")


def tables_uri(out: str, name: str) -> str:
    """``OUT/tables/<name>`` (``certificates.parquet``, ``accuracy.parquet``, ``summary.json``)."""
    return storage.join(tables_dir(out), name)


def config_uri(out: str) -> str:
    return storage.join(out, "config.yaml")


def manifest_uri(out: str) -> str:
    return storage.join(out, "manifest.parquet")


def run_uri(out: str) -> str:
    return storage.join(out, "run.json")


def report_uri(out: str) -> str:
    return storage.join(out, "report.md")


def plot_uri(out: str) -> str:
    return storage.join(out, "certified_accuracy.png")


def tsv_dir(out: str) -> str:
    return storage.join(out, "tsv")


def tsv_name(sigma: float, method: str) -> str:
    """The export file name of one partition: ``sigma=<s>_method=<m>.tsv``."""
    return f"sigma={format_sigma(sigma)}_method={method}.tsv"


def parse_vote_path(uri: str) -> tuple[str, str, int] | None:
    """``(<s>, <m>, shard)`` of a vote file's path, or None when it is outside the layout."""
    m = _VOTE_PATH.search(uri.replace("\\", "/"))
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def vote_files(out: str) -> list[str]:
    """Every vote shard under ``OUT/votes`` in the layout of the data contract, sorted.

    Args:
        out: the OUT root, a local path or an ``s3://`` URI.

    Returns:
        File URIs (``s3://...`` for S3, absolute paths locally); [] when there are none.

    Raises:
        LayoutError: a ``.parquet`` file under ``OUT/votes`` is outside the layout, so it
            would be silently ignored (or silently read) otherwise.
    """
    files = storage.list_files(votes_dir(out), ".parquet")
    stray = [f for f in files if parse_vote_path(f) is None]
    if stray:
        raise LayoutError(
            f"{len(stray)} Parquet file(s) under {votes_dir(out)} are not in the "
            f"layout votes/sigma=<s>/method=<m>/shard=<id>.parquet: {names(stray)}. Move them "
            "out of OUT/votes (aggregate reads every vote shard and nothing else).")
    return files


def error_files(out: str) -> list[str]:
    """Every errors file under ``OUT/errors``, sorted ([] when no image was quarantined)."""
    return storage.list_files(errors_dir(out), ".parquet")


def names(items: Sequence[str], total: int | None = None) -> str:
    """The first few items of a list for an error message, then ``... and N more``."""
    total = len(items) if total is None else total
    shown = ", ".join(str(i) for i in items[:_LIST_SHOWN])
    return shown + (f" ... and {total - _LIST_SHOWN} more" if total > _LIST_SHOWN else "")
