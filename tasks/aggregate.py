"""Stage 3, aggregate: per-image vote counts -> certificates -> certified-accuracy table.

Reads every vote shard ``OUT/votes/sigma=<s>/method=<m>/shard=<id>.parquet`` (local or S3)
with DuckDB, checks the evidence before it publishes anything (no image counted twice, one run
and one config per (sigma, method), counts that add up, expected images all present), runs
CERTIFY of Cohen et al. in SQL, and writes, atomically:

- ``OUT/tables/certificates.parquet``: one row per (sigma, method, image);
- ``OUT/tables/accuracy.parquet``: certified accuracy per (sigma, method) on a radius grid;
- ``OUT/tables/summary.json``: alpha, radii and per-partition image counts (the report reads
  the missing-image note from it).

The exact columns are in docs/schema.md; the paths and schemas come from :mod:`tasks.layout` (the
vote stage writes with the same ones and never imports this module). Nothing here needs a GPU:
a different alpha is a new call on the same votes.

Run it (1,000,000 images take a few seconds on two cores, see benchmarks/aggregate.py)::

    from tasks.aggregate import aggregate
    result = aggregate("results/run1", alpha=0.001)
    print(result.describe())

Why SQL rather than a Python loop over images: the top class (``list_position(counts0,
list_max(counts0))``), n_a and n are list functions DuckDB evaluates in parallel straight from
Parquet; the only Python left is the Clopper-Pearson bound and the radius, and those run as
vectorized UDFs on the *distinct* (sigma, n_a, n) triples only (at most n + 1 per sigma), so
the cost of scipy does not grow with the number of images.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import duckdb
import pyarrow as pa

from densepure_core.config import DEFAULT_RADII
from densepure_core.stats import ABSTAIN

from . import storage
from .faults import fault_point
from .layout import (
    ACCURACY_SCHEMA,
    CERTIFICATES_SCHEMA,
    LayoutError,
    names,
    parse_vote_path,
    tables_uri,
    vote_files,
    votes_dir,
)
from .sqlfuncs import register_udfs

__all__ = [
    "AggregateError",
    "PartitionSummary",
    "AggregateResult",
    "votes_sql",
    "certificates_sql",
    "accuracy_sql",
    "check_votes",
    "check_alpha",
    "check_radii",
    "build_tables",
    "aggregate",
]

_SHOWN = 10  # offending rows fetched for an error message (tasks.layout.names shows 10)


class AggregateError(ValueError):
    """The votes cannot be published as they are; the message names the data and the fix."""


@dataclass(frozen=True)
class PartitionSummary:
    """What one (sigma, method) partition holds.

    Attributes:
        sigma: the smoothing noise level.
        method: the method's name.
        run_id: the single run the partition's votes belong to.
        config_hash: the single config they were voted with.
        num_classes: the length of the count lists.
        images: images with votes.
        labeled: images with a known label (the accuracy denominator).
        abstained: images CERTIFY abstained on (0 until certificates are computed).
        expected: images the caller expected, or None when not given.
        missing: ``expected - images`` (0 when not given).
    """

    sigma: float
    method: str
    run_id: str
    config_hash: str
    num_classes: int
    images: int
    labeled: int
    abstained: int = 0
    expected: int | None = None
    missing: int = 0


@dataclass(frozen=True)
class AggregateResult:
    """What :func:`aggregate` published, with the figures a caller logs.

    Attributes:
        out: the OUT root.
        alpha: the alpha of every certificate.
        radii: the accuracy table's radius grid.
        partitions: one summary per (sigma, method) that has votes or was expected.
        files: vote files read.
        images: images certified (all partitions).
        missing: expected images without votes (all partitions; > 0 only with allow_partial).
        seconds: wall time of the whole call.
        certificates_uri, accuracy_uri, summary_uri: what was written.
    """

    out: str
    alpha: float
    radii: tuple[float, ...]
    partitions: tuple[PartitionSummary, ...]
    files: int
    images: int
    missing: int
    seconds: float
    certificates_uri: str
    accuracy_uri: str
    summary_uri: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        """True when some expected images were missing (only possible with allow_partial)."""
        return self.missing > 0

    def images_per_partition(self) -> dict[tuple[float, str], int]:
        """``{(sigma, method): images}``."""
        return {(p.sigma, p.method): p.images for p in self.partitions}

    def describe(self) -> str:
        """A few human-readable lines for logs and the CLI."""
        lines = [f"certified {self.images} images from {self.files} vote files in "
                 f"{self.seconds:.2f} s (alpha={self.alpha:g})"]
        for p in self.partitions:
            extra = f", {p.missing} of {p.expected} expected images MISSING" if p.missing else ""
            lines.append(f"  sigma={p.sigma:g} method={p.method}: {p.images} images, "
                         f"{p.abstained} abstained{extra}")
        lines.append(f"  wrote {self.certificates_uri}, {self.accuracy_uri}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# reading the votes
# ------------------------------------------------------------------------------------------

def votes_sql(files: Sequence[str], *, filename: bool = False) -> str:
    """A ``read_parquet`` over the given vote files, as a SQL table expression.

    The partition directories are not parsed as hive columns: each file carries its own
    ``sigma`` and ``method`` columns (authoritative, typed), and :func:`check_votes` verifies
    that they agree with the directory names instead.

    Args:
        files: vote file URIs (see :func:`tasks.layout.vote_files`).
        filename: add DuckDB's ``filename`` column (for error messages and path checks).
    """
    if not files:
        raise ValueError("votes_sql needs at least one file")
    listed = ", ".join(_sql_str(f) for f in files)
    return (f"read_parquet([{listed}], hive_partitioning = false"
            f"{', filename = true' if filename else ''})")


# ------------------------------------------------------------------------------------------
# SQL
# ------------------------------------------------------------------------------------------

_BASE_SQL = """
SELECT run_id, config_hash, image_id, label, sigma, method, n0, n AS n_column,
       len(counts0) AS classes0, len(counts) AS classes,
       list_sum(counts0)::BIGINT AS sum0, list_sum(counts)::BIGINT AS n,
       least(list_min(counts0), list_min(counts)) AS min_count,
       pos - 1 AS top,                -- 0-based class index
       counts[pos]::BIGINT AS n_a
       {extra}
FROM (
    -- list_position returns the FIRST position of the maximum: ties go to the lowest class
    -- index, exactly like numpy.argmax in densepure_core.stats.certify_from_counts.
    SELECT *, list_position(counts0, list_max(counts0)) AS pos FROM {source}
)
"""


def certificates_sql(alpha: float, source: str = "votes") -> str:
    """SQL computing the ``certificates`` table (CERTIFY of Cohen et al.) at ``alpha``.

    The top class is ``list_position(counts0, list_max(counts0)) - 1`` (the first maximum:
    ties go to the lowest class index, as ``numpy.argmax``), n_a = counts[top], n =
    sum(counts); the Clopper-Pearson bound and the radius come from the UDFs ``cp_lower`` and
    ``smoothing_radius`` (:func:`tasks.sqlfuncs.register_udfs`), evaluated once per distinct
    (sigma, n_a, n). Runs as it is on the ``votes`` view of :func:`tasks.query.connect`.

    Args:
        alpha: one-sided error level in (0, 1).
        source: a relation with the vote columns (at least run_id, image_id, label, sigma,
            method, n0, n, counts0, counts, config_hash): a table or view name, or a
            parenthesized subquery.

    Returns:
        A SELECT statement with the columns of :data:`CERTIFICATES_SCHEMA`, sorted by
        (sigma, method, image_id).

    Example:
        >>> con = connect("results/run1")  # doctest: +SKIP
        >>> con.sql(certificates_sql(0.01)).df()  # doctest: +SKIP
    """
    base = "(" + _BASE_SQL.format(source=source, extra="") + ")"
    return _certificates_from_base(alpha, base)


def _certificates_from_base(alpha: float, source: str) -> str:
    """:func:`certificates_sql` on a relation that already has top, n_a and n (``_BASE_SQL``)."""
    a = check_alpha(alpha)
    return f"""
WITH bounds AS (
    SELECT sigma, n_a, n, p_a_lower, smoothing_radius(sigma, p_a_lower) AS r
    FROM (SELECT sigma, n_a, n, cp_lower(n_a, n, {a!r}) AS p_a_lower
          FROM (SELECT DISTINCT sigma, n_a, n FROM {source}))
)
SELECT s.run_id, s.image_id, s.sigma, s.method, s.label::INTEGER AS label,
       (CASE WHEN b.p_a_lower >= 0.5 THEN s.top ELSE {ABSTAIN} END)::INTEGER AS prediction,
       s.n_a::BIGINT AS n_a, s.n::BIGINT AS n, {a!r}::DOUBLE AS alpha, b.p_a_lower,
       CASE WHEN b.p_a_lower >= 0.5 THEN b.r ELSE 0.0 END AS radius,
       -- an unknown label (-1) makes correctness unknown, never "abstained == label"
       CASE WHEN s.label < 0 THEN NULL ELSE (b.p_a_lower >= 0.5 AND s.top = s.label) END
           AS correct
FROM {source} s JOIN bounds b ON s.sigma = b.sigma AND s.n_a = b.n_a AND s.n = b.n
ORDER BY s.sigma, s.method, s.image_id
"""


def accuracy_sql(radii: Iterable[float] | None = None, source: str = "certificates") -> str:
    """SQL computing the ``accuracy`` table from certificates.

    Certified accuracy at r = (images with correct = true and radius >= r) / (images with a
    known label), Cohen's "approximate certified accuracy" (abstentions count as wrong), the
    same number as ``densepure_core.stats.certified_accuracy``.

    Args:
        radii: the radius grid (default :data:`DEFAULT_RADII`); finite, >= 0.
        source: a relation with the columns of :data:`CERTIFICATES_SCHEMA`.

    Returns:
        A SELECT statement with the columns of :data:`ACCURACY_SCHEMA`, sorted by
        (sigma, method, radius).
    """
    grid = check_radii(radii)
    values = ", ".join(f"({r!r}::DOUBLE)" for r in grid)
    # Not a cross join of every certificate with every radius: each correct certificate is
    # placed (ASOF join) at the largest grid radius it reaches, and a grid radius r then counts
    # the certificates placed at r or above. Same comparisons (radius >= r), N rows instead of
    # N x R.
    return f"""
WITH grid AS (SELECT * FROM (VALUES {values}) g(radius)),
totals AS (
    SELECT run_id, sigma, method, count(correct) AS images FROM {source} GROUP BY ALL
),
placed AS (
    SELECT c.run_id, c.sigma, c.method, g.radius, count(*) AS hits
    FROM (SELECT run_id, sigma, method, radius FROM {source} WHERE correct) c
    ASOF JOIN grid g ON c.radius >= g.radius
    GROUP BY ALL
)
SELECT t.run_id, t.sigma, t.method, g.radius,
       CASE WHEN t.images = 0 THEN NULL
            ELSE coalesce(sum(p.hits), 0) / t.images END::DOUBLE AS certified_accuracy,
       t.images::BIGINT AS images
FROM totals t CROSS JOIN grid g
LEFT JOIN placed p
       ON p.run_id = t.run_id AND p.sigma = t.sigma AND p.method = t.method
      AND p.radius >= g.radius
GROUP BY t.run_id, t.sigma, t.method, g.radius, t.images
ORDER BY t.sigma, t.method, g.radius
"""


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------

# name -> (what is wrong, SQL condition on the base relation that finds the offending rows)
_CONTRACT_CHECKS: dict[str, tuple[str, str]] = {
    "nulls": ("rows with a NULL in a required column",
              "run_id IS NULL OR config_hash IS NULL OR image_id IS NULL OR label IS NULL"
              " OR sigma IS NULL OR method IS NULL OR classes0 IS NULL OR classes IS NULL"
              " OR n0 IS NULL OR n_column IS NULL"),
    "bad_length": ("rows whose counts0 and counts are empty or differ in length",
                   "classes0 = 0 OR classes0 <> classes"),
    "negative": ("rows with a negative count", "min_count < 0"),
    "bad_sum": ("rows whose counts0 do not sum to n0 or counts to n (or sum to 0)",
                "sum0 <> n0 OR n <> n_column OR sum0 = 0 OR n = 0"),
    "bad_label": ("rows whose label is neither -1 nor a class index",
                  "label < -1 OR label >= classes0"),
    "bad_sigma": ("rows whose sigma is not a finite positive number",
                  "NOT (sigma > 0) OR isinf(sigma)"),
}


def check_votes(con: duckdb.DuckDBPyConnection, source: str = "base") -> list[PartitionSummary]:
    """Refuse evidence that would give a wrong table; summarize the partitions.

    Checks, each failing with an :class:`AggregateError` that names the rows or files:
    every image appears once per (sigma, method) (a duplicate would be counted twice); each
    partition holds one run_id, one config_hash and one number of classes; count lists are
    non-empty, non-negative, of equal length, and sum to n0 and n; labels are -1 or a class;
    each file's sigma/method columns match its directory.

    Args:
        con: a connection where ``source`` exists (see :func:`build_tables`).
        source: relation with the columns of ``_BASE_SQL`` plus ``filename``.

    Returns:
        One :class:`PartitionSummary` per (sigma, method), sorted.
    """
    counts = con.sql("SELECT " + ", ".join(
        f"count(*) FILTER (WHERE {cond})" for _, cond in _CONTRACT_CHECKS.values())
        + f" FROM {source}").fetchall()[0]
    found = [(name, n) for name, n in zip(_CONTRACT_CHECKS, counts) if n]
    if found:
        what, cond = _CONTRACT_CHECKS[found[0][0]]
        examples = con.sql(f"SELECT DISTINCT filename FROM {source} WHERE {cond} "
                           f"ORDER BY filename LIMIT {_SHOWN}").fetchall()
        summary = "; ".join(f"{n} {_CONTRACT_CHECKS[name][0]}" for name, n in found)
        raise AggregateError(
            f"the vote files break the data contract (docs/schema.md): {summary}. First files "
            f"with {what}: {names([e[0] for e in examples])}. Re-vote those shards "
            "(delete the files and resume the run); the vote stage must write tasks.layout.VOTES_SCHEMA.")

    # Directory names are for people and pruning; the columns decide. They must agree, or a
    # file was copied into the wrong partition.
    misplaced = []
    for fname, sigmas, methods in con.sql(
            f"SELECT filename, list(DISTINCT sigma), list(DISTINCT method) FROM {source} "
            "GROUP BY filename ORDER BY filename").fetchall():
        m = parse_vote_path(fname)
        try:
            dir_sigma = float(m[0]) if m else math.nan
        except ValueError:
            dir_sigma = math.nan
        if not m or sigmas != [dir_sigma] or methods != [m[1]]:
            misplaced.append(f"{fname} (holds sigma={sigmas} method={methods})")
    if misplaced:
        raise AggregateError(
            f"{len(misplaced)} vote file(s) hold rows of another partition than their "
            f"directory says: {names(misplaced)}. Move each file to "
            "votes/sigma=<repr(float(sigma))>/method=<method>/ or re-vote it.")

    dup_count, = con.sql(f"""
        SELECT count(*) FROM (SELECT 1 FROM {source} GROUP BY sigma, method, image_id
                              HAVING count(*) > 1)""").fetchall()[0]
    if dup_count:
        dups = con.sql(f"""
            SELECT sigma, method, image_id, count(*) AS copies,
                   list(DISTINCT filename ORDER BY filename)
            FROM {source} GROUP BY sigma, method, image_id HAVING count(*) > 1
            ORDER BY sigma, method, image_id LIMIT {_SHOWN}""").fetchall()
        shown = [f"sigma={s!r} method={m} image_id={i!r} x{c} in {files}"
                 for s, m, i, c, files in dups]
        raise AggregateError(
            f"{dup_count} image(s) have more than one vote row in the same (sigma, method); an "
            f"image must never be counted twice: {names(shown, total=dup_count)}. Remove the "
            "duplicated shard files (keep one row per image) and aggregate again.")

    parts = con.sql(f"""
        SELECT sigma, method, list(DISTINCT run_id ORDER BY run_id),
               list(DISTINCT config_hash ORDER BY config_hash),
               list(DISTINCT classes0 ORDER BY classes0), count(*),
               count(*) FILTER (WHERE label >= 0)
        FROM {source} GROUP BY sigma, method ORDER BY sigma, method""").fetchall()
    out = []
    for sigma, method, runs, hashes, classes, images, labeled in parts:
        for what, values in (("run_id", runs), ("config_hash", hashes),
                             ("number of classes", classes)):
            if len(values) > 1:
                raise AggregateError(
                    f"partition sigma={sigma!r} method={method} mixes {len(values)} values of "
                    f"{what}: {values}. Votes of different runs or configs must never be "
                    "pooled: delete the stale shards (or aggregate into a fresh OUT) and re-vote.")
        out.append(PartitionSummary(sigma=float(sigma), method=method, run_id=runs[0],
                                    config_hash=hashes[0], num_classes=int(classes[0]),
                                    images=int(images), labeled=int(labeled)))
    return out


def _apply_expected(parts: list[PartitionSummary],
                    expected: Mapping[tuple[float, str], int] | None,
                    allow_partial: bool) -> list[PartitionSummary]:
    """Count what was expected against what exists; refuse or annotate the shortfall."""
    if not expected:
        return parts
    want = {}
    for key, count in expected.items():
        try:
            sigma, method = key
            want[(float(sigma), str(method))] = int(count)
        except (TypeError, ValueError):
            raise AggregateError(f"expected must map (sigma, method) to an image count, got "
                                 f"{key!r}: {count!r}") from None
    by_key = {(p.sigma, p.method): p for p in parts}
    over, short, result = [], [], []
    for p in parts:
        exp = want.get((p.sigma, p.method))
        if exp is None:  # partitions the caller did not mention are not checked
            result.append(p)
            continue
        if p.images > exp:
            over.append(f"sigma={p.sigma!r} method={p.method}: {p.images} images, {exp} expected")
        missing = max(exp - p.images, 0)
        if missing:
            short.append(f"sigma={p.sigma!r} method={p.method}: {p.images} of {exp} images "
                         f"({missing} missing)")
        result.append(replace(p, expected=exp, missing=missing))
    for (sigma, method), exp in sorted(want.items()):
        if (sigma, method) not in by_key and exp > 0:
            short.append(f"sigma={sigma!r} method={method}: 0 of {exp} images ({exp} missing)")
            result.append(PartitionSummary(sigma=sigma, method=method, run_id="", config_hash="",
                                           num_classes=0, images=0, labeled=0,
                                           expected=exp, missing=exp))
    if over:
        raise AggregateError(
            f"more images than expected: {'; '.join(over)}. The votes do not belong to this "
            "plan: check OUT and the expected counts (allow_partial does not cover this).")
    if short and not allow_partial:
        raise AggregateError(
            f"refusing to publish accuracy over fewer images than expected: {'; '.join(short)}. "
            "Resume the run to vote the missing shards, or pass allow_partial=True "
            "(--allow-partial) to publish a table that says how many images are missing.")
    return sorted(result, key=lambda p: (p.sigma, p.method))


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------

def build_tables(con: duckdb.DuckDBPyConnection, files: Sequence[str], *, alpha: float,
                 radii: Iterable[float] | None = None,
                 expected: Mapping[tuple[float, str], int] | None = None,
                 allow_partial: bool = False,
                 timings: dict[str, float] | None = None,
                 ) -> tuple[pa.Table, pa.Table, list[PartitionSummary]]:
    """Check the votes and compute certificates and accuracy in ``con`` (nothing is written).

    Creates the temporary tables ``base`` (one compact row per image, no count lists) and
    ``certificates`` in ``con``; registers the UDFs if needed. For ``s3://`` files the caller
    must have registered the S3 filesystem on ``con``.

    Args:
        con: a DuckDB connection with file access.
        files: vote files (:func:`tasks.layout.vote_files`), at least one.
        alpha: one-sided error level of CERTIFY, in (0, 1).
        radii: accuracy radius grid (default :data:`DEFAULT_RADII`).
        expected: ``{(sigma, method): images}`` the plan promised (None: not checked).
        allow_partial: publish even when images are missing (the summaries say how many).
        timings: if given, filled with seconds per step.

    Returns:
        (certificates, accuracy, partition summaries) as Arrow tables in the schemas above.

    Raises:
        AggregateError: the votes break the contract, hold duplicates, or fall short of
            ``expected`` without ``allow_partial``.
    """
    timings = {} if timings is None else timings
    a = check_alpha(alpha)
    grid = check_radii(radii)
    if not files:
        raise AggregateError("no vote files to aggregate: run the vote stage first")
    register_udfs(con)

    t0 = time.perf_counter()
    con.execute("CREATE OR REPLACE TEMP TABLE base AS "
                + _BASE_SQL.format(source=votes_sql(files, filename=True), extra=", filename"))
    timings["read_votes"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    parts = _apply_expected(check_votes(con, "base"), expected, allow_partial)
    timings["checks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    con.execute("CREATE OR REPLACE TEMP TABLE certificates AS "
                + _certificates_from_base(a, "base"))
    certificates = con.sql("SELECT * FROM certificates").to_arrow_table().cast(CERTIFICATES_SCHEMA)
    timings["certify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    accuracy = con.sql(accuracy_sql(grid, "certificates")).to_arrow_table().cast(ACCURACY_SCHEMA)
    abstained = dict(((s, m), int(c)) for s, m, c in con.sql(
        f"SELECT sigma, method, count(*) FILTER (WHERE prediction = {ABSTAIN}) FROM certificates "
        "GROUP BY ALL").fetchall())
    parts = [replace(p, abstained=abstained.get((p.sigma, p.method), 0)) for p in parts]
    timings["accuracy"] = time.perf_counter() - t0
    return certificates, accuracy, parts


def aggregate(out: str, *, alpha: float, radii: list[float] | None = None,
              expected: dict[tuple[float, str], int] | None = None,
              allow_partial: bool = False) -> AggregateResult:
    """Certify every voted image of OUT at ``alpha`` and publish the tables (stage 3).

    Reads ``OUT/votes/**/*.parquet``, checks them (:func:`check_votes`), computes certificates
    and certified accuracy in DuckDB, and writes ``OUT/tables/certificates.parquet``,
    ``OUT/tables/accuracy.parquet`` and ``OUT/tables/summary.json``, each atomically (a reader
    sees the old file or the new one, never half of one). Idempotent: the same votes and
    arguments give byte-identical Parquet tables.

    Args:
        out: the OUT root, a local path or ``s3://bucket/prefix``.
        alpha: one-sided error level of CERTIFY, in (0, 1); e.g. 0.001.
        radii: the accuracy table's radius grid (default :data:`DEFAULT_RADII` of
            ``densepure_core.config``, the config's ``radii`` default).
        expected: ``{(sigma, method): images}`` the plan promised; fewer images are refused
            unless ``allow_partial``; more are always refused. Partitions not named are not
            checked. None: no check.
        allow_partial: publish even when expected images are missing; the result, summary.json
            and the report then say how many.

    Returns:
        :class:`AggregateResult` with per-partition image counts and timings.

    Raises:
        AggregateError: no votes, broken votes, duplicates, or missing images (see above).
        tasks.storage.StorageError: OUT cannot be read or written.

    Example:
        >>> r = aggregate("results/run1", alpha=0.001,
        ...               expected={(0.25, "dds"): 500}, allow_partial=False)  # doctest: +SKIP
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    a = check_alpha(alpha)
    grid = check_radii(radii)
    try:
        files = vote_files(out)
    except LayoutError as exc:
        raise AggregateError(str(exc)) from None
    if not files:
        raise AggregateError(f"no vote files under {votes_dir(out)}: run the vote "
                             "stage first (or check the OUT path)")
    con = duckdb.connect(":memory:")
    try:
        if storage.is_s3(out):
            con.register_filesystem(storage.split_uri(out)[0])
        certificates, accuracy, parts = build_tables(
            con, files, alpha=a, radii=grid, expected=expected, allow_partial=allow_partial,
            timings=timings)
    finally:
        con.close()

    t0 = time.perf_counter()
    cert_uri, acc_uri = tables_uri(out, "certificates.parquet"), tables_uri(out, "accuracy.parquet")
    summary_uri = tables_uri(out, "summary.json")
    storage.write_parquet_atomic(cert_uri, certificates)
    fault_point("aggregate:after-certificates")
    storage.write_parquet_atomic(acc_uri, accuracy)
    result = AggregateResult(
        out=out, alpha=a, radii=grid, partitions=tuple(parts), files=len(files),
        images=sum(p.images for p in parts), missing=sum(p.missing for p in parts),
        seconds=0.0, certificates_uri=cert_uri, accuracy_uri=acc_uri, summary_uri=summary_uri,
        timings=timings)
    # summary.json last: its presence and timestamp say the two tables above are complete.
    storage.write_bytes_atomic(summary_uri, _summary_json(result).encode("utf-8"))
    timings["write"] = time.perf_counter() - t0
    return replace(result, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _summary_json(result: AggregateResult) -> str:
    doc = {
        "alpha": result.alpha,
        "radii": list(result.radii),
        "files": result.files,
        "images": result.images,
        "missing": result.missing,
        "partial": result.partial,
        "partitions": [asdict(p) for p in result.partitions],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in (0, 1), or a ValueError saying what is expected."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = math.nan
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), e.g. 0.001; got {alpha!r}")
    return a


def check_radii(radii: Iterable[float] | None) -> tuple[float, ...]:
    """The radius grid, sorted and deduplicated; None: the config's default grid
    (``densepure_core.config.DEFAULT_RADII``, the one grid of the project)."""
    if radii is None:
        return tuple(DEFAULT_RADII)
    grid = sorted({float(r) for r in radii})
    if not grid or not all(math.isfinite(r) and r >= 0.0 for r in grid):
        raise ValueError(f"radii must be a non-empty list of finite numbers >= 0, e.g. "
                         f"[0, 0.25, 0.5]; got {radii!r}")
    return tuple(grid)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
