"""Stage 3's SQL text: the vote relation, CERTIFY as a SELECT, and the accuracy table.

Pure string builders (plus the validation of their ``alpha`` and ``radii``), run by
:mod:`tasks.certify.aggregate` on its scratch connection and, as they are, by ``densepure sql`` on the
read-only views of :func:`tasks.common.sql.connect`. A leaf of the stage layer: no tasks imports.

Why SQL rather than a Python loop over images: the top class (``list_position(counts0,
list_max(counts0))``), n_a and n are list functions DuckDB evaluates in parallel straight from
Parquet; the only Python left is the Clopper-Pearson bound and the radius, and those run as
vectorized UDFs on the *distinct* (sigma, n_a, n) triples only (at most n + 1 per sigma), so
the cost of scipy does not grow with the number of images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from densepure_core.certification.sequential import FIXED_BOUND
from densepure_core.certification.stats import ABSTAIN
from densepure_core.config import DEFAULT_RADII

__all__ = [
    "SAMPLING_DEFAULTS",
    "votes_sql",
    "certificates_sql",
    "accuracy_sql",
    "check_alpha",
    "check_radii",
]


# ------------------------------------------------------------------------------------------
# reading the votes
# ------------------------------------------------------------------------------------------

def votes_sql(files: Sequence[str], *, filename: bool = False) -> str:
    """A ``read_parquet`` over the given vote files, as a SQL table expression.

    The partition directories are not parsed as hive columns: each file carries its own
    ``sigma`` and ``method`` columns (authoritative, typed), and
    :func:`tasks.certify.aggregate_checks.check_votes` verifies that they agree with the directory
    names instead.

    Args:
        files: vote file URIs (see :meth:`tasks.common.run_dir.RunDir.vote_files`).
        filename: add DuckDB's ``filename`` column (for error messages and path checks).
    """
    if not files:
        raise ValueError("votes_sql needs at least one file")
    listed = ", ".join(_sql_str(f) for f in files)
    # union_by_name: files written before the sampling columns existed read them as NULL
    # (_BASE_SQL reads NULL as a fixed row, SAMPLING_DEFAULTS)
    return (f"read_parquet([{listed}], hive_partitioning = false, union_by_name = true"
            f"{', filename = true' if filename else ''})")


#: The sampling columns of VOTES_SCHEMA and the value a fixed-sampling row has, as SQL over the
#: row (``n`` is the row's n column). Vote files written before these columns existed hold only
#: fixed-sampling votes, so a missing or NULL value reads as this (docs/schema.md).
SAMPLING_DEFAULTS: dict[str, str] = {
    "sampling": "'fixed'", "n_used": "n", "n_max": "n", "bound": f"'{FIXED_BOUND}'", "bound_params": "'{}'",
}


#: The fingerprints of the models that voted a row (NULL in files written before they existed, and
#: the diffusion model's for plain RS).
FINGERPRINT_COLUMNS = ("classifier_fingerprint", "diffusion_fingerprint")


def with_sampling_columns(source: str, columns: Sequence[str]) -> str:
    """``source`` with the sampling and fingerprint columns it lacks (``columns``: the ones it has)
    added as NULL: files written before those columns existed."""
    missing = [c for c in (*SAMPLING_DEFAULTS, *FINGERPRINT_COLUMNS) if c not in columns]
    if not missing:
        return source
    added = ", ".join(f"NULL AS {c}" for c in missing)
    return f"(SELECT *, {added} FROM {source})"


# ------------------------------------------------------------------------------------------
# SQL
# ------------------------------------------------------------------------------------------

_BASE_SQL = """
SELECT run_id, config_hash, image_id, label, sigma, method, n0, n AS n_column,
       len(counts0) AS classes0, len(counts) AS classes,
       list_sum(counts0)::BIGINT AS sum0, list_sum(counts)::BIGINT AS n,
       least(list_min(counts0), list_min(counts)) AS min_count,
       pos - 1 AS top,                -- 0-based class index
       counts[pos]::BIGINT AS n_a, classifier_fingerprint, diffusion_fingerprint,
       {sampling}
       {extra}
FROM (
    -- list_position returns the FIRST position of the maximum: ties go to the lowest class
    -- index, exactly like numpy.argmax in densepure_core.certification.stats.certify_from_counts.
    SELECT *, list_position(counts0, list_max(counts0)) AS pos FROM {source}
)
"""


def certificates_sql(alpha: float, source: str = "votes") -> str:
    """SQL computing the ``certificates`` table (CERTIFY of Cohen et al.) at ``alpha``.

    The top class is ``list_position(counts0, list_max(counts0)) - 1`` (the first maximum:
    ties go to the lowest class index, as ``numpy.argmax``), n_a = counts[top], n =
    sum(counts); the Clopper-Pearson bound and the radius come from the UDFs ``cp_lower`` and
    ``smoothing_radius`` (:func:`tasks.common.sqlfuncs.register_udfs`), evaluated once per distinct
    (sigma, n_a, n). Runs as it is on the ``votes`` view of :func:`tasks.certify.views.register`.

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
    base = "(" + base_sql(source) + ")"
    return _certificates_from_base(alpha, base)


def base_sql(source: str, extra: str = "") -> str:
    """``_BASE_SQL`` over ``source`` (which must have the sampling columns, NULL allowed)."""
    sampling = ",\n       ".join(f"coalesce({c}, {d}) AS {c}" for c, d in SAMPLING_DEFAULTS.items())
    return _BASE_SQL.format(source=source, extra=extra, sampling=sampling)


def _certificates_from_base(alpha: float, source: str) -> str:
    """:func:`certificates_sql` on a relation that already has top, n_a and n (``_BASE_SQL``)."""
    a = check_alpha(alpha)
    return f"""
WITH bounds AS (
    -- fixed rows: Clopper-Pearson at n; adaptive rows: their anytime-valid bound at n = n_used
    -- with the stored parameters (never the fixed-n Clopper-Pearson bound)
    SELECT sigma, n_a, n, sampling, bound, bound_params, p_a_lower,
           smoothing_radius(sigma, p_a_lower) AS r
    FROM (SELECT sigma, n_a, n, sampling, bound, bound_params,
                 CASE WHEN sampling = 'adaptive'
                      THEN anytime_lower(n_a, n, {a!r}, bound, bound_params)
                      ELSE cp_lower(n_a, n, {a!r}) END AS p_a_lower
          FROM (SELECT DISTINCT sigma, n_a, n, sampling, bound, bound_params FROM {source}))
)
SELECT s.run_id, s.image_id, s.sigma, s.method, s.label::INTEGER AS label,
       (CASE WHEN b.p_a_lower >= 0.5 THEN s.top ELSE {ABSTAIN} END)::INTEGER AS prediction,
       s.n_a::BIGINT AS n_a, s.n::BIGINT AS n, {a!r}::DOUBLE AS alpha, b.p_a_lower,
       CASE WHEN b.p_a_lower >= 0.5 THEN b.r ELSE 0.0 END AS radius,
       -- an unknown label (-1) makes correctness unknown, never "abstained == label"
       CASE WHEN s.label < 0 THEN NULL ELSE (b.p_a_lower >= 0.5 AND s.top = s.label) END
           AS correct,
       s.sampling, s.bound
FROM {source} s JOIN bounds b ON s.sigma = b.sigma AND s.n_a = b.n_a AND s.n = b.n
     AND s.sampling = b.sampling AND s.bound = b.bound AND s.bound_params = b.bound_params
ORDER BY s.sigma, s.method, s.image_id
"""


def accuracy_sql(radii: Iterable[float] | None = None, source: str = "certificates") -> str:
    """SQL computing the ``accuracy`` table from certificates.

    Certified accuracy at r = (images with correct = true and radius >= r) / (images with a
    known label), Cohen's "approximate certified accuracy" (abstentions count as wrong), the
    same number as ``densepure_core.certification.stats.certified_accuracy``.

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
    SELECT run_id, sigma, method, min(alpha) AS alpha, count(correct) AS images
    FROM {source} GROUP BY run_id, sigma, method
),
placed AS (
    SELECT c.run_id, c.sigma, c.method, g.radius, count(*) AS hits
    FROM (SELECT run_id, sigma, method, radius FROM {source} WHERE correct) c
    ASOF JOIN grid g ON c.radius >= g.radius
    GROUP BY ALL
)
SELECT t.run_id, t.sigma, t.method, t.alpha, g.radius,
       CASE WHEN t.images = 0 THEN NULL
            ELSE coalesce(sum(p.hits), 0) / t.images END::DOUBLE AS certified_accuracy,
       t.images::BIGINT AS images
FROM totals t CROSS JOIN grid g
LEFT JOIN placed p
       ON p.run_id = t.run_id AND p.sigma = t.sigma AND p.method = t.method
      AND p.radius >= g.radius
GROUP BY t.run_id, t.sigma, t.method, t.alpha, g.radius, t.images
ORDER BY t.sigma, t.method, g.radius
"""


# ------------------------------------------------------------------------------------------
# validating the arguments
# ------------------------------------------------------------------------------------------

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
