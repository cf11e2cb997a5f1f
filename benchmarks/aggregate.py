"""Benchmark of the aggregate stage: DuckDB certificates vs the reference per-image Python loop.

Run it (about a minute on two cores; the vote files go to a temporary directory)::

    .venv/bin/python benchmarks/aggregate.py            # 1,000,000 x 10 classes, 50,000 x 1,000
    .venv/bin/python benchmarks/aggregate.py --scale 0.01   # a quick smoke run

Two workloads of synthetic votes (tests/votes_factory.py, the exact vote schema, n0 =
100, n = 10,000, shards of 10,000 / 5,000 images):

- 1m: 1,000,000 images with 10 classes (2 sigmas x 2 methods x 250,000);
- 50k_1000c: 50,000 images with 1,000 classes (ImageNet-sized count lists).

Each is timed through :func:`tasks.certify.aggregate.aggregate` end to end (read every shard, check,
certify, accuracy table, write both tables). The baseline is the loop of the reference scripts
(Cohen et al.'s ``certify.py`` and its DDS/DensePure copies): per image argmax, the
statsmodels ``proportion_confint(method="beta")`` bound, which is ``scipy.stats.beta.ppf`` on
scalars, and ``scipy.stats.norm.ppf``. The loop is timed on a random subsample of images whose
counts are already in memory (reading Parquet is not charged to it) and extrapolated linearly
to the full workload: the output says so. The loop's predictions and radii are checked against
the published certificates on that subsample.

The last line is ``key=value`` pairs for CI logs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repo root for `tasks`, tests/ for the vote factory (a test helper, not a package).
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from scipy.stats import beta, norm  # noqa: E402
from votes_factory import counts_matrix, make_votes, write_votes  # noqa: E402

from tasks.certify.aggregate import aggregate  # noqa: E402

ALPHA = 0.001
N0, N = 100, 10_000


def write_workload(out: str, partitions: list[tuple[float, str]], images: int, classes: int,
                   shard_size: int) -> None:
    """Write ``images`` images per partition, generated shard by shard to bound memory."""
    for p, (sigma, method) in enumerate(partitions):
        for shard, start in enumerate(range(0, images, shard_size)):
            count = min(shard_size, images - start)
            table = make_votes(count, classes, sigma=sigma, method=method, n0=N0, n=N,
                               seed=1000 * p + shard, first_image=start)
            write_votes(out, table, first_shard=shard)


def reference_loop(counts0: np.ndarray, counts: np.ndarray, sigma: float) -> tuple[list, list]:
    """CERTIFY per image, as the reference scripts do it (statsmodels' beta bound = beta.ppf)."""
    predictions, radii = [], []
    for c0, c in zip(counts0, counts):
        c_a = int(c0.argmax())
        n_a, n = int(c[c_a]), int(c.sum())
        # statsmodels proportion_confint(n_a, n, alpha=2*ALPHA, method="beta")[0]
        p_a = 0.0 if n_a == 0 else float(beta.ppf(ALPHA, n_a, n - n_a + 1))
        if p_a < 0.5:
            predictions.append(-1)
            radii.append(0.0)
        else:
            predictions.append(c_a)
            radii.append(sigma * norm.ppf(p_a))
    return predictions, radii


def bench(name: str, out: str, partitions: list[tuple[float, str]], images: int, classes: int,
          shard_size: int, sample: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    write_workload(out, partitions, images, classes, shard_size)
    total = images * len(partitions)
    print(f"[{name}] wrote {total:,} images x {classes} classes in "
          f"{time.perf_counter() - t0:.1f} s")

    result = aggregate(out, alpha=ALPHA)
    assert result.images == total, result.describe()
    steps = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
    print(f"[{name}] DuckDB aggregate: {result.seconds:.2f} s for {total:,} images "
          f"({total / result.seconds:,.0f} images/s; {steps})")

    # Baseline: the first shard of the first partition, a random subsample of its rows.
    sigma, method = partitions[0]
    shard = pq.read_table(os.path.join(out, "votes", f"sigma={sigma!r}", f"method={method}",
                                       "shard=00000.parquet"))
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(shard.num_rows, size=min(sample, shard.num_rows), replace=False))
    sub = shard.take(rows)
    c0, c = counts_matrix(sub["counts0"]), counts_matrix(sub["counts"])
    t0 = time.perf_counter()
    predictions, radii = reference_loop(c0, c, sigma)
    loop = time.perf_counter() - t0
    per_image = loop / len(rows)
    extrapolated = per_image * total
    speedup = extrapolated / result.seconds
    print(f"[{name}] Python loop: {loop:.2f} s for a subsample of {len(rows):,} images "
          f"({per_image * 1e6:.0f} us/image), EXTRAPOLATED to {total:,} images: "
          f"{extrapolated:,.0f} s; speed-up {speedup:,.0f}x")

    cert = pq.read_table(result.certificates_uri, filters=[("sigma", "=", sigma),
                                                          ("method", "=", method)])
    by_id = dict(zip(cert["image_id"].to_pylist(), range(cert.num_rows)))
    idx = [by_id[i] for i in sub["image_id"].to_pylist()]
    got = cert.take(idx)
    same = (got["prediction"].to_pylist() == predictions
            and np.allclose(got["radius"].to_numpy(), radii, rtol=1e-9, atol=0))
    print(f"[{name}] loop and DuckDB agree on the subsample: {same}")
    if not same:
        raise SystemExit(f"[{name}] MISMATCH between the reference loop and the certificates")
    abstained = pc.sum(pc.equal(cert["prediction"], -1)).as_py()
    print(f"[{name}] sanity: {abstained:,} of {cert.num_rows:,} abstained in {sigma}/{method}")
    return result.seconds, speedup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the image counts (1.0: 1,000,000 and 50,000)")
    parser.add_argument("--sample", type=int, default=2000,
                        help="images in the Python-loop subsample")
    parser.add_argument("--keep", default=None, help="write the votes here instead of a temp dir")
    args = parser.parse_args(argv)

    per_partition_1m = max(int(250_000 * args.scale), 1)
    images_50k = max(int(50_000 * args.scale), 1)
    with tempfile.TemporaryDirectory(prefix="bench-aggregate-") as tmp:
        base = args.keep or tmp
        s1, x1 = bench("1m", os.path.join(base, "1m"),
                       [(0.25, "dds"), (0.25, "densepure"), (0.5, "dds"), (0.5, "densepure")],
                       per_partition_1m, 10, 10_000, args.sample)
        s2, x2 = bench("50k_1000c", os.path.join(base, "50k_1000c"), [(0.5, "dds")], images_50k,
                       1000, 5_000, args.sample)
    suffix = "" if args.scale == 1.0 else f" scale={args.scale:g}"
    print(f"seconds_1m={s1:.2f} speedup_1m={x1:.1f} seconds_50k_1000c={s2:.2f} "
          f"speedup_50k_1000c={x2:.1f}{suffix}")


if __name__ == "__main__":
    main()
