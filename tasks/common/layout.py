"""The Parquet schemas of OUT's files and the pieces of its path formats: the data contract
(docs/schema.md).

The paths themselves are methods of :class:`tasks.common.run_dir.RunDir` (its docstring draws the
whole tree); this module holds what they and the readers share: the schemas, ``<s>`` of a path
(:func:`format_sigma`), parsing a vote file's path, and the names of files in messages. So the
vote stage (which writes the votes and errors files) and the aggregate stage (which reads them)
never depend on each other.

Imports nothing of the project: a leaf of the stage layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pyarrow as pa

__all__ = [
    "VOTES_SCHEMA", "CERTIFICATES_SCHEMA", "ACCURACY_SCHEMA", "ERRORS_SCHEMA", "ATTACKS_SCHEMA",
    "ATTACK_SUMMARY_SCHEMA", "TRAIN_METRICS_SCHEMA", "LayoutError", "format_sigma", "parse_vote_path",
    "tsv_name", "checkpoint_name", "names",
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
    # adaptive rows: n_used = n <= n_max, the anytime bound (sequential.BOUNDS) and its JSON
    # parameters. Files written before these columns existed are read as fixed rows.
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("n_used", pa.int32(), nullable=False),
    pa.field("n_max", pa.int32(), nullable=False),
    pa.field("bound", pa.string(), nullable=False),
    pa.field("bound_params", pa.string(), nullable=False),
    # the fingerprints of the models that voted (tasks/certify/models.py): the classifier's, and the
    # diffusion model's (NULL for plain RS). NULL in files written before these columns existed.
    pa.field("classifier_fingerprint", pa.string(), nullable=True),
    pa.field("diffusion_fingerprint", pa.string(), nullable=True),
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
    ("bound", pa.string()),  # the bound p_a_lower is: "clopper-pearson" or one of sequential.BOUNDS
])
"""``OUT/tables/certificates.parquet``: CERTIFY per image, sorted by (sigma, method, image_id)."""

ACCURACY_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("sigma", pa.float64()),
    ("method", pa.string()),
    ("alpha", pa.float64()),  # the alpha of the certificates counted (one per table)
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

ATTACKS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
    pa.field("defense", pa.string(), nullable=False),
    pa.field("threat", pa.string(), nullable=False),
    pa.field("norm", pa.string(), nullable=False),  # "linf" or "l2"
    pa.field("eps", pa.float64(), nullable=False),
    pa.field("attack", pa.string(), nullable=False),
    pa.field("attack_kind", pa.string(), nullable=False),  # "pgd_eot", "dwbox", "bpda"
    pa.field("t_star", pa.int32(), nullable=False),  # -1: no purification
    pa.field("steps", pa.int32(), nullable=False),  # denoiser calls per purification (0: none)
    pa.field("k", pa.int32(), nullable=False),  # purifications per prediction (majority)
    pa.field("iterations", pa.int32(), nullable=False),
    pa.field("eot", pa.int32(), nullable=False),  # purifications per gradient (x K), as run
    pa.field("step_size", pa.float64(), nullable=False),
    pa.field("random_start", pa.bool_(), nullable=False),
    pa.field("gradient_calls", pa.int64(), nullable=False),
    pa.field("unet_calls", pa.int64(), nullable=False),  # attack and scoring, recomputation included
    pa.field("seconds", pa.float64(), nullable=False),
    pa.field("linf", pa.float64(), nullable=False),  # the final perturbation's norms
    pa.field("l2", pa.float64(), nullable=False),
    pa.field("score_purifications", pa.int32(), nullable=False),  # M as scored (1: deterministic)
    pa.field("clean_predictions", pa.list_(pa.int32()), nullable=False),  # [M]
    pa.field("adv_predictions", pa.list_(pa.int32()), nullable=False),  # [M]
    pa.field("clean_mean", pa.float64(), nullable=False),
    pa.field("clean_majority", pa.bool_(), nullable=False),
    pa.field("clean_worst", pa.bool_(), nullable=False),
    pa.field("adv_mean", pa.float64(), nullable=False),
    pa.field("adv_majority", pa.bool_(), nullable=False),
    pa.field("adv_worst", pa.bool_(), nullable=False),
    # DiffBreak's any-iterate check (config any_iterate; null when it did not run): the first checked
    # point (0: the clean image, i: after PGD iteration i) where the majority of / any one of the M'
    # fresh purifications was wrong; -1: none.
    pa.field("iterate_purifications", pa.int32(), nullable=True),  # M' as run (1: deterministic)
    pa.field("broken_at_majority", pa.int32(), nullable=True),
    pa.field("broken_at_worst", pa.int32(), nullable=True),
    pa.field("worker", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # the fingerprints of the models that produced the row (tasks/common/models.py): the
    # classifier's, and the diffusion model's (NULL for the bare classifier)
    pa.field("classifier_fingerprint", pa.string(), nullable=True),
    pa.field("diffusion_fingerprint", pa.string(), nullable=True),
])
"""One row per image in ``OUT/attacks/defense=<d>/threat=<t>/attack=<a>/shard=<id>.parquet``."""

ATTACK_SUMMARY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("defense", pa.string()), ("threat", pa.string()), ("attack", pa.string()),
    ("rule", pa.string()),  # "mean", "majority", "worst"
    ("images", pa.int64()),
    ("clean_accuracy", pa.float64()), ("clean_low", pa.float64()), ("clean_high", pa.float64()),
    ("robust_accuracy", pa.float64()), ("robust_low", pa.float64()), ("robust_high", pa.float64()),
    ("confidence", pa.float64()),  # of the Wilson intervals
    ("gradient_calls", pa.float64()), ("unet_calls", pa.float64()), ("seconds", pa.float64()),  # per image
])
"""``OUT/tables/attack_summary.parquet`` and the ``attack_summary`` view: robust accuracy per
(defense, threat, attack, scoring rule) with Wilson score intervals over the images."""

TRAIN_METRICS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),  # optimisation steps done after this one (1-based)
    pa.field("loss", pa.float64(), nullable=False),  # the ADDT loss, averaged over the workers
    pa.field("grad_norm", pa.float64(), nullable=False),  # before clipping
    pa.field("lr", pa.float64(), nullable=False),
    pa.field("ema_decay", pa.float64(), nullable=False),
    pa.field("mix_mean", pa.float64(), nullable=False),  # mean lambda_t (gaussian) or r_t (linf) of the batch
    pa.field("seconds", pa.float64(), nullable=False),  # the step's wall time on rank 0
    pa.field("workers", pa.int32(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
"""One row per optimisation step in ``OUT/metrics/steps=<first>-<last>.parquet`` (``train_metrics``
view). A file covers the steps after one checkpoint up to the next, and is written just before
that checkpoint: a resumed run rewrites the same file with the same rows."""

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


def tsv_name(sigma: float, method: str) -> str:
    """The export file name of one partition: ``sigma=<s>_method=<m>.tsv``."""
    return f"sigma={format_sigma(sigma)}_method={method}.tsv"


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint after ``step`` steps: ``step-000300``."""
    return f"step-{step:06d}"


def parse_vote_path(uri: str) -> tuple[str, str, int] | None:
    """``(<s>, <m>, shard)`` of a vote file's path, or None when it is outside the layout."""
    m = _VOTE_PATH.search(uri.replace("\\", "/"))
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def names(items: Sequence[str], total: int | None = None) -> str:
    """The first few items of a list for an error message, then ``... and N more``."""
    total = len(items) if total is None else total
    shown = ", ".join(str(i) for i in items[:_LIST_SHOWN])
    return shown + (f" ... and {total - _LIST_SHOWN} more" if total > _LIST_SHOWN else "")
