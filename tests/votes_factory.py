"""Synthetic vote files in the exact schema of the vote stage (``tasks.common.layout.VOTES_SCHEMA``).

For tests and benchmarks that need votes without a GPU: :func:`make_votes` builds a table of
plausible per-image counts (or takes the counts you give it), :func:`write_votes` writes it as
``OUT/votes/sigma=<s>/method=<m>/shard=<id>.parquet`` shards through ``tasks.common.storage``, exactly
as the vote stage lays them out. Everything is vectorized, so a million images take seconds.

Example::

    from votes_factory import make_votes, write_votes
    table = make_votes(100, num_classes=10, sigma=0.25, method="dds", seed=0)
    write_votes(tmp_path, table, shard_size=25)          # 4 shards
    write_votes(tmp_path, make_votes(3, counts0=[[5, 5, 0]] * 3, counts=[[9, 1, 0]] * 3))
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.common import storage
from tasks.common.layout import VOTES_SCHEMA

__all__ = ["CREATED_AT", "HAND_IDS", "HAND_LABELS", "HAND_COUNTS0", "HAND_COUNTS", "make_votes",
           "write_votes", "hand_votes", "vote_uri", "counts_matrix"]

CREATED_AT = datetime(2025, 1, 1, tzinfo=timezone.utc)  # fixed, so written files are stable

# A six-image hand example (sigma = 0.5, 3 classes) whose certificates at alpha = 0.001 the
# tests pin: a predicts 1 (r 0.889), b ties 50/50 and abstains, c predicts 2 (n_a = n,
# r 1.232), d's selected class 2 gets only 400 of 1000 and abstains, e predicts 0 against
# label 1, f has no label (-1).
HAND_IDS = ["a", "b", "c", "d", "e", "f"]
HAND_LABELS = [1, 0, 2, 2, 1, -1]
HAND_COUNTS0 = [[2, 95, 3], [50, 50, 0], [1, 0, 99], [0, 30, 70], [10, 0, 0], [0, 10, 0]]
HAND_COUNTS = [[10, 980, 10], [500, 500, 0], [0, 0, 1000], [0, 600, 400], [1000, 0, 0],
               [0, 1000, 0]]


def vote_uri(out: str, sigma: float, method: str, shard: int) -> str:
    """``OUT/votes/sigma=<repr(float(sigma))>/method=<method>/shard=<5 digits>.parquet``."""
    return storage.join(str(out), "votes", f"sigma={float(sigma)!r}", f"method={method}",
                        f"shard={shard:05d}.parquet")


def _list_array(counts: np.ndarray) -> pa.Array:
    """A dense ``[N, C]`` int matrix as a ``list<int32>`` array, without a Python loop."""
    n_rows, n_cls = counts.shape
    offsets = pa.array(np.arange(0, (n_rows + 1) * n_cls, n_cls, dtype=np.int32))
    values = pa.array(np.ascontiguousarray(counts, dtype=np.int32).ravel())
    return pa.ListArray.from_arrays(offsets, values)


def counts_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``list<int32>`` column with equal-length lists back as an ``[N, C]`` int64 matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n_rows = len(arr)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return flat.reshape(n_rows, -1) if n_rows else flat.reshape(0, 0)


def _synthetic_counts(rng: np.random.Generator, labels: np.ndarray, num_classes: int, n0: int,
                      n: int, accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts where the base classifier mostly votes for one class per image.

    Per image: a target class (the label with probability ``accuracy``, else another class),
    a top-class probability p (most near 1, a tail of hard images), a runner-up and a third
    class. counts0 and counts are independent draws with the same p, like the selection and
    estimation copies of CERTIFY, so counts0's argmax is occasionally not the target.
    """
    num = labels.shape[0]
    rows = np.arange(num)
    known = np.where(labels >= 0, labels, rng.integers(0, num_classes, num))
    if num_classes > 1:
        wrong = (known + rng.integers(1, num_classes, num)) % num_classes
        target = np.where(rng.random(num) < accuracy, known, wrong)
        runner = (target + rng.integers(1, num_classes, num)) % num_classes
        third = (target + rng.integers(1, num_classes, num)) % num_classes
    else:
        target = runner = third = np.zeros(num, dtype=np.int64)
    p = np.clip(1.0 - rng.exponential(0.12, num), 0.05, 1.0)
    out = []
    for total in (n0, n):
        counts = np.zeros((num, num_classes), dtype=np.int32)
        top = rng.binomial(total, p)
        second = rng.binomial(total - top, 0.6)
        counts[rows, target] += top.astype(np.int32)
        counts[rows, runner] += second.astype(np.int32)
        counts[rows, third] += (total - top - second).astype(np.int32)
        out.append(counts)
    return out[0], out[1]


def make_votes(num_images: int, num_classes: int = 10, *, sigma: float = 0.25,
               method: str = "dds", n0: int = 100, n: int = 1000, accuracy: float = 0.8,
               seed: int = 0, run_id: str = "run-test", config_hash: str = "cfg-test",
               id_prefix: str = "img", first_image: int = 0,
               image_ids: Sequence[str] | None = None, labels: Sequence[int] | None = None,
               counts0: Sequence[Sequence[int]] | np.ndarray | None = None,
               counts: Sequence[Sequence[int]] | np.ndarray | None = None,
               seconds: float | Sequence[float] = 1.0, t_star: int = 145, k: int = 1,
               steps: int = 1, worker: str = "worker-0", sampling: str = "fixed",
               n_max: int | None = None, bound: str | None = None,
               bound_params: str = "{}", classifier_fingerprint: str | None = "clf-fp",
               diffusion_fingerprint: str | None = "ddpm-fp") -> pa.Table:
    """Vote rows of one (sigma, method) partition, in :data:`VOTES_SCHEMA`.

    Args:
        num_images: rows to make (ignored when ``counts0`` is given: its length decides).
        num_classes: C, the length of every count list (from ``counts0`` when given).
        sigma, method: the partition.
        n0, n: selection and estimation copies per image (sums of ``counts0`` / ``counts``
            when those are given).
        accuracy: probability that the synthetic top class is the label.
        seed: numpy seed for labels and counts.
        run_id, config_hash, worker, t_star, k, steps: constant metadata columns.
        id_prefix, first_image: image ids are ``f"{id_prefix}{i:07d}"`` from ``first_image``.
        image_ids, labels: explicit ids / labels (-1 = unknown) instead of generated ones.
        counts0, counts: explicit ``[N, C]`` counts instead of synthetic ones (both or neither).
        seconds: per-image seconds (scalar or one per image).
        sampling, n_max, bound, bound_params: the sampling columns (default: fixed rows,
            n_max = n, bound "clopper-pearson"); n_used is always sum(counts).

    Returns:
        A pyarrow Table with exactly :data:`VOTES_SCHEMA`.
    """
    rng = np.random.default_rng(seed)
    if (counts0 is None) != (counts is None):
        raise ValueError("give both counts0 and counts, or neither")
    if counts0 is not None:
        c0 = np.asarray(counts0, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
        if c0.ndim != 2 or c0.shape != c.shape:
            raise ValueError(f"counts0 and counts must be [N, C] of one shape, got {c0.shape} "
                             f"and {c.shape}")
        num_images, num_classes = c0.shape
    if labels is None:
        lab = rng.integers(0, num_classes, num_images).astype(np.int32)
    else:
        lab = np.asarray(labels, dtype=np.int32)
        if lab.shape != (num_images,):
            raise ValueError(f"labels must have {num_images} entries, got {lab.shape}")
    if counts0 is None:
        c0, c = _synthetic_counts(rng, lab, num_classes, n0, n, accuracy)
        n0_col = np.full(num_images, n0, dtype=np.int32)
        n_col = np.full(num_images, n, dtype=np.int32)
    else:
        n0_col = c0.sum(axis=1).astype(np.int32)
        n_col = c.sum(axis=1).astype(np.int32)
    if image_ids is None:
        ids = pa.array([f"{id_prefix}{i:07d}"
                        for i in range(first_image, first_image + num_images)])
    else:
        ids = pa.array([str(i) for i in image_ids], pa.string())
        if len(ids) != num_images:
            raise ValueError(f"image_ids must have {num_images} entries, got {len(ids)}")
    copies = (n0_col.astype(np.int64) + n_col) * k
    secs = np.broadcast_to(np.asarray(seconds, dtype=np.float64), (num_images,))
    columns = {
        "run_id": pa.array(np.full(num_images, run_id, dtype=object), pa.string()),
        "config_hash": pa.array(np.full(num_images, config_hash, dtype=object), pa.string()),
        "image_id": ids,
        "label": pa.array(lab, pa.int32()),
        "sigma": pa.array(np.full(num_images, float(sigma)), pa.float64()),
        "method": pa.array(np.full(num_images, method, dtype=object), pa.string()),
        "t_star": pa.array(np.full(num_images, t_star, dtype=np.int32)),
        "k": pa.array(np.full(num_images, k, dtype=np.int32)),
        "steps": pa.array(np.full(num_images, steps, dtype=np.int32)),
        "n0": pa.array(n0_col),
        "n": pa.array(n_col),
        "counts0": _list_array(c0),
        "counts": _list_array(c),
        "unet_calls": pa.array(copies * steps, pa.int64()),
        "classifier_calls": pa.array(copies, pa.int64()),
        "seconds": pa.array(np.array(secs), pa.float64()),
        "worker": pa.array(np.full(num_images, worker, dtype=object), pa.string()),
        "seed": pa.array(np.full(num_images, seed, dtype=np.int64)),
        "created_at": pa.array(np.full(num_images, CREATED_AT.replace(tzinfo=None),
                                       dtype="datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "sampling": pa.array(np.full(num_images, sampling, dtype=object), pa.string()),
        "n_used": pa.array(n_col),
        "n_max": pa.array(n_col if n_max is None else np.full(num_images, n_max, dtype=np.int32)),
        "bound": pa.array(np.full(num_images, bound or ("clopper-pearson" if sampling == "fixed" else "staged"),
                                  dtype=object), pa.string()),
        "bound_params": pa.array(np.full(num_images, bound_params, dtype=object), pa.string()),
        "classifier_fingerprint": pa.array([classifier_fingerprint] * num_images, pa.string()),
        "diffusion_fingerprint": pa.array([diffusion_fingerprint] * num_images, pa.string()),
    }
    return pa.Table.from_arrays([columns[f.name] for f in VOTES_SCHEMA], schema=VOTES_SCHEMA)


def write_votes(out: str, table: pa.Table, *, shard_size: int | None = None,
                first_shard: int = 0) -> list[str]:
    """Write ``table`` as vote shards under OUT, one directory per (sigma, method).

    Args:
        out: the OUT root (local path or ``s3://``).
        table: rows in :data:`VOTES_SCHEMA` (any number of partitions).
        shard_size: rows per shard (default: one shard per partition).
        first_shard: number of the first shard of every partition.

    Returns:
        The URIs written, in order.
    """
    table = table.cast(VOTES_SCHEMA)
    written = []
    keys = sorted(set(zip(table.column("sigma").to_pylist(), table.column("method").to_pylist())))
    for sigma, method in keys:
        mask = pc.and_(pc.equal(table.column("sigma"), sigma),
                       pc.equal(table.column("method"), method))
        part = table.filter(mask)
        size = shard_size or max(part.num_rows, 1)
        for i, start in enumerate(range(0, part.num_rows, size)):
            uri = vote_uri(out, sigma, method, first_shard + i)
            storage.write_parquet_atomic(uri, part.slice(start, size))
            written.append(uri)
    return written


def hand_votes(out: str, **kw) -> pa.Table:
    """Write the hand example (:data:`HAND_IDS` ...) under OUT as one shard; return its table.

    Args:
        out: the OUT root.
        **kw: passed to :func:`make_votes` (e.g. ``seconds=[...]``, ``run_id=``).
    """
    table = make_votes(0, sigma=0.5, method="dds", image_ids=HAND_IDS, labels=HAND_LABELS,
                       counts0=HAND_COUNTS0, counts=HAND_COUNTS, **kw)
    write_votes(str(out), table)
    return table
