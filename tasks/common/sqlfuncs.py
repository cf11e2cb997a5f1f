"""DuckDB statistics UDFs: Clopper-Pearson, anytime and Wilson bounds, normal quantile, radius, binomial test.

DuckDB has no inverse-Beta, inverse-normal or exact binomial test, so :func:`register_udfs`
adds them as Arrow UDFs backed by ``densepure_core.certification.stats`` (scipy.special underneath). Each
UDF is called once per DuckDB vector (2,048 rows) with whole Arrow arrays, never per row.

A leaf of the stage layer (no tasks imports): the aggregate stage registers them on its
connection, :func:`tasks.common.sql.connect` on the read-only results connection.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from scipy import special

from densepure_core.certification import sequential, stats

__all__ = ["UDFS", "register_udfs"]


# ------------------------------------------------------------------------------------------
# UDFs
# ------------------------------------------------------------------------------------------

def _np(a: pa.ChunkedArray | pa.Array) -> np.ndarray:
    # DuckDB's default null handling never passes NULLs (NULL in -> NULL out), so the
    # conversion is exact.
    return a.to_numpy()


def _cp_lower(n_a, n, alpha):
    return pa.array(stats.clopper_pearson_lower(_np(n_a), _np(n), _np(alpha)), pa.float64())


def _anytime_lower(n_a, n, alpha, bound, bound_params):
    """sequential.anytime_lower_bound per row, with each row's bound and JSON parameters."""
    n_a, n, alpha = _np(n_a), _np(n), _np(alpha).astype(np.float64)
    bounds = np.asarray(bound.to_pylist(), dtype=object)
    params = np.asarray(bound_params.to_pylist(), dtype=object)
    out = np.empty(n.shape, dtype=np.float64)
    for b, p in set(zip(bounds.tolist(), params.tolist())):
        rows = (bounds == b) & (params == p)
        out[rows] = sequential.anytime_lower_bound(n_a[rows], n[rows], alpha[rows], b, **json.loads(p))
    return pa.array(out, pa.float64())


def _norm_ppf(p):
    return pa.array(special.ndtri(_np(p).astype(np.float64)), pa.float64())


def _smoothing_radius(sigma, p_a_lower):
    return pa.array(stats.certified_radius(_np(sigma), _np(p_a_lower)), pa.float64())


def _binom_pvalue(c1, c2):
    return pa.array(stats.binomial_test_pvalue(_np(c1), _np(c2)), pa.float64())


def _wilson_low(successes, n, confidence):
    return pa.array(stats.wilson_interval(_np(successes), _np(n), _confidence(confidence))[0], pa.float64())


def _wilson_high(successes, n, confidence):
    return pa.array(stats.wilson_interval(_np(successes), _np(n), _confidence(confidence))[1], pa.float64())


def _confidence(confidence) -> float:
    values = np.unique(_np(confidence))
    if len(values) != 1:
        raise ValueError("wilson_low/wilson_high: the confidence must be one constant per query")
    return float(values[0])


UDFS: dict[str, tuple[Any, list[str], str, str]] = {
    "cp_lower": (_cp_lower, ["BIGINT", "BIGINT", "DOUBLE"], "DOUBLE",
                 "cp_lower(n_a, n, alpha): one-sided (1 - alpha) Clopper-Pearson lower bound "
                 "of n_a / n (0 when n_a = 0)"),
    "anytime_lower": (_anytime_lower, ["BIGINT", "BIGINT", "DOUBLE", "VARCHAR", "VARCHAR"], "DOUBLE",
                      "anytime_lower(n_a, n_used, alpha, bound, bound_params): the anytime-valid lower "
                      "bound of adaptive sampling (densepure_core.certification.sequential.anytime_lower_bound; "
                      "bound one of sequential.BOUNDS, bound_params its JSON parameters)"),
    "norm_ppf": (_norm_ppf, ["DOUBLE"], "DOUBLE",
                 "norm_ppf(p): the standard normal quantile Phi^-1(p) (scipy.special.ndtri)"),
    "smoothing_radius": (_smoothing_radius, ["DOUBLE", "DOUBLE"], "DOUBLE",
                         "smoothing_radius(sigma, p_a_lower): sigma * Phi^-1(p_a_lower), "
                         "0 below 0.5"),
    "binom_pvalue": (_binom_pvalue, ["BIGINT", "BIGINT"], "DOUBLE",
                     "binom_pvalue(c1, c2): two-sided exact binomial test of c1 successes in "
                     "c1 + c2 trials at p = 0.5 (scipy.stats.binomtest)"),
    "wilson_low": (_wilson_low, ["DOUBLE", "BIGINT", "DOUBLE"], "DOUBLE",
                   "wilson_low(successes, n, confidence): the lower end of Wilson's score interval "
                   "of successes / n (two-sided; successes may be fractional)"),
    "wilson_high": (_wilson_high, ["DOUBLE", "BIGINT", "DOUBLE"], "DOUBLE",
                    "wilson_high(successes, n, confidence): the upper end of Wilson's score interval"),
}
"""name -> (function, parameter types, return type, one-line description)."""


def register_udfs(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Register the statistics UDFs of :data:`UDFS` on ``con`` (idempotent).

    All are vectorized Arrow UDFs without side effects (DuckDB may cache and reorder them);
    NULL in any argument gives NULL. Out-of-range input (n_a > n, alpha outside (0, 1),
    negative counts, p outside [0, 1] for the radius) raises the ``ValueError`` of
    ``densepure_core.certification.stats`` through DuckDB, naming the argument.

    Args:
        con: the connection.

    Returns:
        ``con``, for chaining.
    """
    have = {r[0] for r in con.sql(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'scalar'"
    ).fetchall()}
    for name, (fn, params, ret, _doc) in UDFS.items():
        if name not in have:
            con.create_function(name, fn, params, ret, type="arrow", side_effects=False)
    return con
