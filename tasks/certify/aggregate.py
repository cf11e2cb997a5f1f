"""Stage 3, aggregate: per-image vote counts -> certificates -> certified-accuracy table.

Reads every vote shard ``OUT/votes/sigma=<s>/method=<m>/shard=<id>.parquet`` (local or S3)
with DuckDB, checks the evidence before it publishes anything (no image counted twice, one run
and one config per (sigma, method), counts that add up, expected images all present), runs
CERTIFY of Cohen et al. in SQL, and writes, atomically:

- ``OUT/tables/certificates.parquet``: one row per (sigma, method, image);
- ``OUT/tables/accuracy.parquet``: certified accuracy per (sigma, method) on a radius grid;
- ``OUT/tables/summary.json``: alpha, radii and per-partition image counts (the report reads
  the missing-image note from it).

The exact columns are in docs/schema.md; the paths and schemas come from :mod:`tasks.common.layout` (the
vote stage writes with the same ones and never imports this module). Nothing here needs a GPU:
a different alpha is a new call on the same votes.

The work is split by job: :mod:`tasks.certify.aggregate_sql` writes the SQL (votes, CERTIFY, accuracy),
:mod:`tasks.certify.aggregate_checks` refuses bad evidence, and this module runs both and publishes.

Run it (1,000,000 images take a few seconds on two cores, see benchmarks/aggregate.py)::

    from tasks.certify.aggregate import aggregate
    result = aggregate("results/run1", alpha=0.001)
    print(result.describe())
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import duckdb
import pyarrow as pa

from densepure_core.certification.stats import ABSTAIN
from tasks.certify.aggregate_checks import (
    AggregateError,
    PartitionSummary,
    _apply_expected,
    _apply_quarantined,
    check_votes,
)
from tasks.certify.aggregate_sql import (
    _certificates_from_base,
    accuracy_sql,
    base_sql,
    certificates_sql,
    check_alpha,
    check_radii,
    votes_sql,
    with_sampling_columns,
)
from tasks.common.faults import fault_point
from tasks.common.layout import ACCURACY_SCHEMA, CERTIFICATES_SCHEMA, LayoutError
from tasks.common.run_dir import RunDir
from tasks.common.sqlfuncs import register_udfs

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


@dataclass(frozen=True)
class AggregateResult:
    """What :func:`aggregate` published, with the figures a caller logs.

    Attributes:
        out: the OUT root (:attr:`RunDir.root`).
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
        files: vote files (:meth:`tasks.common.run_dir.RunDir.vote_files`), at least one.
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
    source = votes_sql(files, filename=True)
    columns = [r[0] for r in con.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()]
    con.execute("CREATE OR REPLACE TEMP TABLE base AS "
                + base_sql(with_sampling_columns(source, columns), extra=", filename"))
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


def aggregate(out: RunDir | str, *, alpha: float, radii: list[float] | None = None,
              expected: dict[tuple[float, str], int] | None = None,
              allow_partial: bool = False,
              quarantined: dict[tuple[float, str], int] | None = None) -> AggregateResult:
    """Certify every voted image of OUT at ``alpha`` and publish the tables (stage 3).

    Reads ``OUT/votes/**/*.parquet``, checks them (:func:`check_votes`), computes certificates
    and certified accuracy in DuckDB, and writes ``OUT/tables/certificates.parquet``,
    ``OUT/tables/accuracy.parquet`` and ``OUT/tables/summary.json``, each atomically (a reader
    sees the old file or the new one, never half of one). Idempotent: the same votes and
    arguments give byte-identical Parquet tables.

    Args:
        out: the OUT (a :class:`RunDir`, or its root: a local path or ``s3://bucket/prefix``).
        alpha: one-sided error level of CERTIFY, in (0, 1); e.g. 0.001.
        radii: the accuracy table's radius grid (default :data:`DEFAULT_RADII` of
            ``densepure_core.config``, the config's ``radii`` default).
        expected: ``{(sigma, method): images}`` the plan promised; fewer images are refused
            unless ``allow_partial``; more are always refused. Partitions not named are not
            checked. None: no check.
        allow_partial: publish even when expected images are missing; the result, summary.json
            and the report then say how many.
        quarantined: ``{(sigma, method): images}`` in the errors table
            (:func:`tasks.common.quarantine.quarantined_counts`); recorded per partition in summary.json, and
            a partition whose every image was quarantined is kept there with 0 images.

    Returns:
        :class:`AggregateResult` with per-partition image counts and timings.

    Raises:
        AggregateError: no votes, broken votes, duplicates, or missing images (see above).
        tasks.common.storage.StorageError: OUT cannot be read or written.

    Example:
        >>> r = aggregate("results/run1", alpha=0.001,
        ...               expected={(0.25, "dds"): 500}, allow_partial=False)  # doctest: +SKIP
    """
    start = time.perf_counter()
    run = RunDir.of(out)
    timings: dict[str, float] = {}
    a = check_alpha(alpha)
    grid = check_radii(radii)
    try:
        files = run.vote_files()
    except LayoutError as exc:
        raise AggregateError(str(exc)) from None
    if not files:
        raise AggregateError(f"no vote files under {run.votes_dir}: run the vote "
                             "stage first (or check the OUT path)")
    con = duckdb.connect(":memory:")
    try:
        if run.is_s3:
            con.register_filesystem(run.fs)
        certificates, accuracy, parts = build_tables(
            con, files, alpha=a, radii=grid, expected=expected, allow_partial=allow_partial,
            timings=timings)
    except Exception as exc:
        # The traceback's frames hold the DuckDB connection and its relations, and Prefect keeps
        # a failed task's error until the interpreter exits, when nanobind then reported them
        # as leaked (screens of warnings after the error: line). Drop the frames; the message
        # is the whole story.
        traceback.clear_frames(exc.__traceback__)
        con.close()
        con = None
        raise exc.with_traceback(None) from None
    finally:
        if con is not None:
            con.close()
    parts = _apply_quarantined(parts, quarantined)

    t0 = time.perf_counter()
    cert_uri, acc_uri = run.tables_uri("certificates.parquet"), run.tables_uri("accuracy.parquet")
    summary_uri = run.tables_uri("summary.json")
    run.write_parquet(cert_uri, certificates)
    fault_point("aggregate:after-certificates")
    run.write_parquet(acc_uri, accuracy)
    result = AggregateResult(
        out=run.root, alpha=a, radii=grid, partitions=tuple(parts), files=len(files),
        images=sum(p.images for p in parts), missing=sum(p.missing for p in parts),
        seconds=0.0, certificates_uri=cert_uri, accuracy_uri=acc_uri, summary_uri=summary_uri,
        timings=timings)
    # summary.json last: its presence and timestamp say the two tables above are complete.
    run.write_bytes(summary_uri, _summary_json(result).encode("utf-8"))
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
