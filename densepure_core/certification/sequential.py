"""Adaptive (per-image) sample size for CERTIFY with an anytime-valid guarantee.

Fixed CERTIFY (Cohen et al. 2019; :func:`densepure_core.certification.stats.certify_from_counts`) spends the
same n estimation copies on every image. Here the n0 selection copies choose cA as before; the
estimation copies are then drawn in batches and, at each *look*, an anytime-valid bound gives
``[lower, upper]`` for pA = P(f(x + e) = cA). An image stops at the first look where

1. ``upper < 1/2``: it can only abstain (reason ``"abstain"``), or
2. its bucket on the run's radius grid is decided: with ``i`` the largest grid index whose
   radius the lower bound certifies (``lower >= Phi(r_i / sigma)``; the abstain bucket lies below
   r_0), either ``upper < Phi(r_{i+1} / sigma)`` (``"upper"``: the next radius is ruled out), or
   ``r_{i+1}`` is out of reach even if every remaining copy up to ``n_max`` votes cA
   (``"unreachable"``), or ``r_i`` is the largest grid radius (``"top"``), or
3. ``n_max`` estimation copies are spent (``"n_max"``).

The certified radius is ``sigma * Phi^-1(lower)`` at the stop (abstain, radius 0, when
``lower < 1/2``, exactly like fixed CERTIFY).

Guarantee: both bounds below satisfy ``P(exists look k: lower_k > pA) <= alpha``. The stopping
look is one of the looks, so with probability at least 1 - alpha the returned certificate is
correct, *whatever rule chose the stop* (this rule, an adversarial one, or a person looking at
the counts). The upper bound only steers the stopping, never the certificate, so its coverage
does not enter the guarantee.

Bounds (``bound=``):

``"staged"`` (default): Clopper-Pearson at looks fixed in advance, alpha split across them by a
union bound: look ``k`` (at ``looks[k]`` estimation copies) uses
``clopper_pearson_lower(nA, looks[k], alpha * w_k)`` with ``sum_k w_k = 1``. Each term fails with
probability at most ``alpha * w_k`` (exact CP at a fixed n), so all looks together fail with
probability at most alpha. ``split="equal"`` (default) gives ``alpha / K`` to each of the K looks
(as Horvath et al., ICLR 2022, "Boosting randomized smoothing with variance reduced
classifiers", do with their stages); ``split="late"`` gives the last look (``n_max``) alpha / 2
and the others ``alpha / (2 (K - 1))`` each. The default schedule is geometric with ratio 1.5
(:func:`geometric_looks`): ``batch, 2 batch, 3 batch, 5 batch, 8 batch, ...``, then ``n_max``
(12 looks for batch 100, n_max 10^4).

``"betabin"``: Robbins' beta-binomial mixture confidence sequence, valid at every n. For
``X_i ~ Bernoulli(p)`` with ``S_n`` successes in n draws and a Beta(a, b) mixing prior,

    M_n(p) = B(a + S_n, b + n - S_n) / B(a, b) / (p^S_n (1 - p)^(n - S_n))

is the ratio of the Beta-mixture likelihood to the likelihood at p: a nonnegative martingale
under p with M_0 = 1. Ville's inequality gives ``P(exists n: M_n(p) >= 1/alpha) <= alpha``, so
``C_n = {p : M_n(p) < 1/alpha}`` (an interval, since log M_n is convex in p) covers pA at every n
simultaneously, and ``lower = inf C_n``, ``upper = sup C_n`` (Robbins 1970; Howard, Ramdas,
McAuliffe, Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann.
Statist. 2021, Sec. 3.2 / Prop. 6; Waudby-Smith & Ramdas, "Estimating means of bounded random
variables by betting", JRSS-B 2023). The default prior is Jeffreys' a = b = 1/2 (the
Krichevsky-Trofimov mixture, the usual near-minimax-regret choice): with nA = n the bound is
``(alpha B(n + 1/2, 1/2) / pi)^(1/n)``, i.e. CP at about ``alpha / sqrt(pi n)``. (Priors with
more mass near 1 are tighter for pA near 1 and looser elsewhere; ``a``, ``b`` are parameters.)
Looks are every ``batch`` copies; looking more often costs nothing.

Why ``"staged"`` (equal split, ratio 1.5) is the default: with a geometric schedule there are
only ~log(n_max / batch) / log(1.5) looks, so the union bound costs ``log K`` nats of
``log(1/alpha)`` (2.5 nats for K = 12), against ``log sqrt(pi n)`` for the mixture (5.2 nats at
n = 10^4, 4.0 at 10^3). In the simulation of docs/sequential.md it certified larger radii than the
mixture at every pA, with fewer copies except at pA 0.99 and 0.999 (where the mixture's looks
at every batch let it stop sooner) and at pA on a bucket boundary, the equal split used fewer
copies than "late" at the same grid buckets, and ratio 1.5 fewer copies than ratio 2. It is
also exact CP at each look (so with stopping off it *is* fixed CERTIFY) and the simplest to audit.

Re-evaluation from stored fields: :func:`anytime_lower_bound` recomputes the bound from
``(n_a, n_used, alpha, bound, params)`` alone; ``params`` is :attr:`SequentialResult.bound_params`
(``{"looks": [...], "split": "equal"}`` or ``{"a": 0.5, "b": 0.5}``), a JSON-able dict. Nothing
else (no per-look history) is needed: the guarantee covers every look, so only the stop matters.

Example:
    >>> import numpy as np
    >>> labels = np.zeros(10_100, dtype=np.int64)         # a unanimous image
    >>> pos = [0]
    >>> def sample(m):
    ...     out = labels[pos[0]:pos[0] + m]; pos[0] += m; return out
    >>> r = sequential_certify(sample, 100, 10_000, 0.001, 0.5, [0.0, 0.5, 1.0], 100)
    >>> r.prediction, r.n_used, r.stop_reason
    (0, 500, 'top')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from densepure_core.certification.stats import (
    ABSTAIN,
    _as_counts,
    _check_alpha,
    _check_binomial,
    _check_sigma,
    certified_radius,
    clopper_pearson_lower,
)

__all__ = [
    "BOUNDS",
    "FIXED_BOUND",
    "DEFAULT_BOUND",
    "STOP_REASONS",
    "SequentialResult",
    "geometric_looks",
    "batch_looks",
    "default_bound_params",
    "look_alphas",
    "clopper_pearson_upper",
    "anytime_lower_bound",
    "anytime_upper_bound",
    "stop_reasons",
    "evaluate_look",
    "simulate_sequential",
    "sequential_certify",
]

BOUNDS = ("staged", "betabin")
#: The bound name stored with fixed-sampling votes: Clopper-Pearson at a fixed n
#: (:func:`densepure_core.certification.stats.clopper_pearson_lower`); never valid for adaptive rows.
FIXED_BOUND = "clopper-pearson"
DEFAULT_BOUND = "staged"
SPLITS = ("late", "equal")
#: Stop-reason codes of :func:`stop_reasons` (index = code); code 0 means "continue".
STOP_REASONS = ("continue", "abstain", "upper", "unreachable", "top", "n_max")
_CONTINUE, _ABSTAIN, _UPPER, _UNREACHABLE, _TOP, _NMAX = range(6)
_BISECT_STEPS = 64  # enough to reach adjacent doubles on [0, 1]


# --------------------------------------------------------------------------------------------
# schedules and parameters
# --------------------------------------------------------------------------------------------

def _check_positive_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or int(x) != x or int(x) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {x!r}")
    return int(x)


def geometric_looks(batch: int, n_max: int, ratio: float = 1.5) -> tuple[int, ...]:
    """Looks ``batch, ratio*batch, ratio^2*batch, ...`` (rounded to whole batches), ending at n_max.

    Example: ``geometric_looks(100, 10_000)`` is (100, 200, 300, 500, 800, 1100, 1700, 2600,
    3800, 5800, 8600, 10000); ``geometric_looks(100, 10_000, 2)`` is (100, 200, 400, ...,
    6400, 10000).
    """
    batch, n_max = _check_positive_int(batch, "batch"), _check_positive_int(n_max, "n_max")
    if not ratio > 1.0:
        raise ValueError(f"ratio must be > 1, got {ratio!r}")
    looks, m = [], float(batch)
    while True:
        n = int(round(m / batch)) * batch
        if n >= n_max:
            break
        if not looks or n > looks[-1]:
            looks.append(n)
        m *= ratio
    return tuple(looks) + (n_max,)


def batch_looks(batch: int, n_max: int) -> tuple[int, ...]:
    """Every batch boundary: ``batch, 2 batch, ..., n_max`` (the last batch may be partial)."""
    batch, n_max = _check_positive_int(batch, "batch"), _check_positive_int(n_max, "n_max")
    return tuple(range(batch, n_max, batch)) + (n_max,)


def default_bound_params(bound: str, batch: int, n_max: int) -> dict[str, Any]:
    """The parameters :func:`sequential_certify` stores when none are given."""
    if bound == "staged":
        return {"looks": list(geometric_looks(batch, n_max)), "split": "equal"}
    if bound == "betabin":
        return {"a": 0.5, "b": 0.5}
    raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")


def _check_looks(looks: Any) -> np.ndarray:
    arr = np.asarray(looks)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"looks must be a non-empty 1-D sequence of integers, got {looks!r}")
    arr = arr.astype(np.int64)
    if arr[0] < 1 or np.any(np.diff(arr) <= 0):
        raise ValueError(f"looks must be strictly increasing integers >= 1, got {looks!r}")
    return arr


def look_alphas(looks: Sequence[int], alpha: float, split: str = "equal") -> np.ndarray:
    """The alpha of each look of a staged schedule; they sum to ``alpha`` (union bound).

    ``split="late"``: the last look gets alpha / 2 and the other K - 1 looks alpha / (2 (K - 1))
    each (a single look gets alpha). ``split="equal"``: alpha / K each.
    """
    return float(_check_alpha(alpha)) * _look_weights(_check_looks(looks).size, split)


def _look_weights(k: int, split: str) -> np.ndarray:
    """Shares of alpha of the k looks (they sum to 1)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "equal" or k == 1:
        return np.full(k, 1.0 / k)
    out = np.full(k, 0.5 / (k - 1))
    out[-1] = 0.5
    return out


def _check_params(bound: str, params: dict[str, Any]) -> dict[str, Any]:
    if bound == "staged":
        extra = set(params) - {"looks", "split"}
        if extra or "looks" not in params:
            raise ValueError("staged takes params looks (required) and split, "
                             f"got {sorted(params)}")
        return {"looks": [int(v) for v in _check_looks(params["looks"])],
                "split": params.get("split", "equal")}
    if bound == "betabin":
        extra = set(params) - {"a", "b"}
        if extra:
            raise ValueError(f"betabin takes params a and b, got {sorted(params)}")
        a, b = float(params.get("a", 0.5)), float(params.get("b", 0.5))
        if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"betabin prior a, b must be finite and > 0, got {a!r}, {b!r}")
        return {"a": a, "b": b}
    raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")


# --------------------------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------------------------

def clopper_pearson_upper(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound: ``1 - clopper_pearson_lower(n - n_a, n)``.

    By the symmetry of the binomial (failures are Binomial(n, 1 - p)) this is the 1 - alpha
    quantile of Beta(n_a + 1, n - n_a), and exactly 1 when n_a = n.
    """
    n_a, n = _as_counts(n_a, "n_a"), _as_counts(n, "n")
    if np.any(n_a > n):
        raise ValueError("n_a must be <= n for every element")
    return 1.0 - clopper_pearson_lower(n - n_a, n, alpha)


def _betabin_log_mix(s: np.ndarray, n: np.ndarray, a: float, b: float) -> np.ndarray:
    """log of the Beta(a, b)-mixture likelihood B(a + s, b + n - s) / B(a, b)."""
    return special.betaln(a + s, b + n - s) - special.betaln(a, b)


def _betabin_log_m(s: np.ndarray, n: np.ndarray, p: np.ndarray, log_mix: np.ndarray) -> np.ndarray:
    """log M_n(p) of the beta-binomial mixture (module docstring), for 0 < p < 1."""
    return log_mix - s * np.log(p) - (n - s) * np.log1p(-p)


def _betabin_bounds(s: np.ndarray, n: np.ndarray, alpha: np.ndarray, a: float, b: float,
                    side: str) -> np.ndarray:
    """inf (side="lower") or sup ("upper") of {p : log M_n(p) < log(1/alpha)}, by bisection.

    log M_n is convex in p with its minimum (<= 0 < log 1/alpha) at p_hat = s/n, so the set is an
    interval around p_hat. The returned endpoint is always on the conservative side (outside or
    on the boundary): lower is a point with log M >= log(1/alpha) or 0, upper one with it or 1.
    """
    s, n, alpha = np.broadcast_arrays(s.astype(np.float64), n.astype(np.float64), alpha)
    level = -np.log(alpha)  # log(1/alpha)
    log_mix = _betabin_log_mix(s, n, a, b)
    p_hat = s / n
    if side == "lower":
        edge = s == 0                       # log M(p) -> log mix <= 0 as p -> 0: lower = 0
        out_pt, in_pt = np.zeros_like(p_hat), p_hat.copy()
    else:
        edge = s == n
        out_pt, in_pt = np.ones_like(p_hat), p_hat.copy()
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (out_pt + in_pt)
        ok = (mid > 0.0) & (mid < 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            outside = _betabin_log_m(s, n, np.where(ok, mid, 0.5), log_mix) >= level
        outside &= ok
        out_pt = np.where(outside, mid, out_pt)
        in_pt = np.where(outside, in_pt, mid)
    fill = 0.0 if side == "lower" else 1.0
    return np.where(edge, fill, out_pt)


def _prepare(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike, bound: str,
             params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Validated, broadcast (n_a, n, per-element alpha of the look, params)."""
    n_a, n, alpha = _check_binomial(n_a, n, alpha)
    params = _check_params(bound, params)
    if bound == "staged":
        looks = np.asarray(params["looks"], dtype=np.int64)
        idx = np.searchsorted(looks, n)
        on_look = (idx < looks.size) & (looks[np.minimum(idx, looks.size - 1)] == n)
        if not np.all(on_look):
            raise ValueError("staged bound: every n must be one of the looks fixed in advance "
                             f"{params['looks']}, got n = {np.unique(n[~on_look])[:5]}")
        alpha = alpha * _look_weights(looks.size, params["split"])[np.minimum(idx, looks.size - 1)]
    return n_a, n, alpha, params


def anytime_lower_bound(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike, bound: str = DEFAULT_BOUND,
                        **params: Any) -> np.ndarray:
    """Anytime-valid (1 - alpha) lower bound on pA from nA votes in n estimation copies.

    Vectorized over numpy arrays (``n_a``, ``n``, ``alpha`` broadcast). This is the function to
    call when re-certifying from stored fields: ``n_a`` (votes for cA), ``n`` (= ``n_used``),
    ``alpha``, ``bound`` and ``params`` (:attr:`SequentialResult.bound_params`).

    ``bound="staged"``, params ``looks`` (the schedule fixed in advance, required) and ``split``:
    ``clopper_pearson_lower(n_a, n, alpha * w_k)`` where n = looks[k]; every n must be a look.
    ``bound="betabin"``, params ``a``, ``b`` (default 1/2, 1/2): the beta-binomial mixture
    confidence sequence's lower end; any n.

    Guarantee: for any stopping time tau (on the schedule's looks for "staged"),
    ``P(lower(nA_tau, tau) > pA) <= alpha``, because ``P(exists look: lower > pA) <= alpha``.
    """
    n_a, n, a_look, params = _prepare(n_a, n, alpha, bound, params)
    if bound == "staged":
        return clopper_pearson_lower(n_a, n, a_look)
    return _betabin_bounds(n_a, n, a_look, params["a"], params["b"], "lower")


def anytime_upper_bound(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike, bound: str = DEFAULT_BOUND,
                        **params: Any) -> np.ndarray:
    """The matching upper bound (used only to decide when to stop; see the module docstring)."""
    n_a, n, a_look, params = _prepare(n_a, n, alpha, bound, params)
    if bound == "staged":
        return clopper_pearson_upper(n_a, n, a_look)
    return _betabin_bounds(n_a, n, a_look, params["a"], params["b"], "upper")


# --------------------------------------------------------------------------------------------
# the stopping rule
# --------------------------------------------------------------------------------------------

def _thresholds(radii: ArrayLike, sigma: float) -> np.ndarray:
    """pA thresholds: 1/2 (certify at all), then Phi(r / sigma) for each grid radius r > 0."""
    r = np.unique(np.asarray(radii, dtype=np.float64))
    if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"radii must be a non-empty list of finite radii >= 0, got {radii!r}")
    return np.concatenate([[0.5], special.ndtr(r[r > 0] / sigma)])


def stop_reasons(n_a: ArrayLike, n: ArrayLike, lower: ArrayLike, upper: ArrayLike, alpha: float,
                 sigma: float, radii: ArrayLike, n_max: int, schedule: Sequence[int],
                 bound: str = DEFAULT_BOUND, **params: Any) -> np.ndarray:
    """The stopping rule at one look, vectorized over images: int codes into :data:`STOP_REASONS`.

    ``n_a``, ``n``, ``lower``, ``upper`` are per-image arrays at the current look (``n`` a look);
    ``schedule`` is the run's looks (ending at ``n_max``): "unreachable" asks whether any
    *remaining* look could reach the next threshold with every remaining copy voting cA (for
    monotone schedules that is the look at n_max, the issue's wording). Order of precedence:
    abstain, upper, unreachable, top, n_max; 0 = continue.
    """
    n_a, n = np.broadcast_arrays(_as_counts(n_a, "n_a"), _as_counts(n, "n"))
    lower, upper = np.broadcast_arrays(np.asarray(lower, np.float64), np.asarray(upper, np.float64))
    sigma = float(_check_sigma(sigma))
    thr = _thresholds(radii, sigma)
    looks_arr = _check_looks(schedule)
    if looks_arr[-1] != n_max:
        raise ValueError(f"the last look must be n_max = {n_max}, got {looks_arr[-1]}")
    bucket = np.searchsorted(thr, lower, side="right")  # number of thresholds certified
    top = bucket == thr.size
    nxt = thr[np.minimum(bucket, thr.size - 1)]
    reason = np.zeros(n.shape, dtype=np.int64)

    # reachability of the next threshold with every remaining copy correct, at any later look
    reach = np.zeros(n.shape, dtype=bool)
    live = ~top & (n < n_max)
    if np.any(live):
        idx = np.flatnonzero(live.ravel())
        nn, sa, t = n.ravel()[idx], n_a.ravel()[idx], nxt.ravel()[idx]
        m = looks_arr[None, :]
        later = m > nn[:, None]
        # at looks already passed, evaluate a harmless (0 votes at that look) point and mask it
        s_m = np.where(later, sa[:, None] + (m - nn[:, None]), 0)
        mm = np.broadcast_to(m, s_m.shape)
        if bound == "staged":
            lo = anytime_lower_bound(s_m, mm, alpha, bound, **params)
            hit = later & (lo >= t[:, None])
        else:  # lower >= t  <=>  t <= p_hat and log M_m(t) >= log(1/alpha): no root finding
            p = _check_params(bound, params)
            tt = np.broadcast_to(t[:, None], s_m.shape)
            log_m = _betabin_log_m(s_m, mm, np.minimum(tt, np.nextafter(1.0, 0.0)),
                                   _betabin_log_mix(s_m, mm, p["a"], p["b"]))
            hit = later & (tt * mm <= s_m) & (log_m >= -np.log(alpha))
        flat = reach.ravel()
        flat[idx] = hit.any(axis=1)
        reach = flat.reshape(n.shape)

    reason[(n >= n_max)] = _NMAX
    reason[top] = _TOP
    reason[~top & (n < n_max) & ~reach] = _UNREACHABLE
    reason[~top & (upper < nxt)] = _UPPER
    reason[upper < 0.5] = _ABSTAIN
    return reason


# --------------------------------------------------------------------------------------------
# vectorized simulation (tests, docs): many independent Bernoulli(pA) runs at once
# --------------------------------------------------------------------------------------------

def simulate_sequential(increments: ArrayLike, schedule: Sequence[int], alpha: float, sigma: float,
                        radii: ArrayLike, bound: str = DEFAULT_BOUND, stop: bool = True,
                        **params: Any) -> dict[str, np.ndarray]:
    """Run the stopping rule on R runs at once, given each run's cA votes between looks.

    ``increments[r, k]`` = votes for cA among the copies between look k - 1 and look k of
    ``schedule`` (e.g. ``rng.binomial(np.diff([0, *schedule]), pA, size=(R, K))``); for "staged"
    the schedule is also the bound's ``looks`` unless ``params`` gives them. Returns arrays of
    length R:
    ``n_used``, ``n_a``, ``lower``, ``upper``, ``reason`` (codes into :data:`STOP_REASONS`),
    and ``lower_path`` [R, K], the lower bound at every look (to test adversarial stopping).
    """
    inc = _as_counts(increments, "increments")
    looks_arr = _check_looks(schedule)
    if bound == "staged" and "looks" not in params:
        params = dict(params, looks=[int(v) for v in looks_arr])
    if inc.ndim != 2 or inc.shape[1] != looks_arr.size:
        raise ValueError(f"increments must be [R, {looks_arr.size}], got {inc.shape}")
    n_max = int(looks_arr[-1])
    cum = np.cumsum(inc, axis=1)
    r_count, k_count = cum.shape
    n_mat = np.broadcast_to(looks_arr, cum.shape)
    lower_path = anytime_lower_bound(cum, n_mat, alpha, bound, **params)
    upper_path = anytime_upper_bound(cum, n_mat, alpha, bound, **params)
    stop_at = np.full(r_count, k_count - 1)
    reason = np.full(r_count, _NMAX)
    if stop:
        active = np.ones(r_count, dtype=bool)
        for k in range(k_count):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            code = stop_reasons(cum[idx, k], looks_arr[k], lower_path[idx, k], upper_path[idx, k],
                                alpha, sigma, radii, n_max, looks_arr, bound, **params)
            done = idx[code != _CONTINUE]
            stop_at[done], reason[done] = k, code[code != _CONTINUE]
            active[done] = False
    rows = np.arange(r_count)
    return {"n_used": looks_arr[stop_at], "n_a": cum[rows, stop_at],
            "lower": lower_path[rows, stop_at], "upper": upper_path[rows, stop_at],
            "reason": reason, "lower_path": lower_path}


# --------------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SequentialResult:
    """Result of :func:`sequential_certify` for one image.

    Attributes:
        prediction: cA, or ABSTAIN (-1) when ``p_a_lower < 1/2``.
        radius: sigma * Phi^-1(p_a_lower), 0.0 when abstaining.
        n_used: estimation copies drawn (selection copies not included).
        n_a: votes for cA among them.
        counts0: int64 [C], class histogram of the n0 selection copies.
        counts: int64 [C], class histogram of the n_used estimation copies.
        p_a_lower, p_a_upper: the anytime bounds at the stop.
        looks: the estimation counts at which the rule was consulted (the last is n_used).
        alpha: the alpha of the run.
        bound: "staged" or "betabin".
        bound_params: JSON-able parameters of the bound (re-evaluate with
            ``anytime_lower_bound(n_a, n_used, alpha, bound, **bound_params)``).
        stop_reason: one of "abstain", "upper", "unreachable", "top", "n_max".
    """

    prediction: int
    radius: float
    n_used: int
    n_a: int
    counts0: np.ndarray
    counts: np.ndarray
    p_a_lower: float
    p_a_upper: float
    looks: tuple[int, ...]
    alpha: float
    bound: str
    bound_params: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = "n_max"


def _draw(sample: Callable[[int], Any], m: int) -> np.ndarray:
    out = np.asarray(sample(m))
    if out.shape != (m,) or not (np.issubdtype(out.dtype, np.integer) and np.all(out >= 0)):
        raise ValueError(f"sample({m}) must return {m} class labels >= 0 as an int array, got "
                         f"shape {out.shape} dtype {out.dtype}")
    return out.astype(np.int64)


def evaluate_look(n_a: int, n: int, alpha: float, sigma: float, radii: ArrayLike, n_max: int,
                  schedule: Sequence[int], bound: str = DEFAULT_BOUND, stop: bool = True,
                  **params: Any) -> tuple[float, float, int]:
    """One look: (lower, upper, stop code) for nA of n estimation copies.

    The one place where a look is evaluated, by :func:`sequential_certify` and by the engine
    (``smoothing/adaptive.py``). ``schedule``: the looks the rule may still reach (as in
    :func:`stop_reasons`). The code indexes :data:`STOP_REASONS` (0: continue); with ``stop``
    off the only stop is n_max.
    """
    lower = float(anytime_lower_bound(n_a, n, alpha, bound, **params))
    upper = float(anytime_upper_bound(n_a, n, alpha, bound, **params))
    if stop:
        code = int(stop_reasons(n_a, n, lower, upper, alpha, sigma, radii, n_max, schedule, bound, **params))
    else:
        code = _NMAX if n >= n_max else _CONTINUE
    return lower, upper, code


def sequential_certify(sample: Callable[[int], ArrayLike], n0: int, n_max: int, alpha: float,
                       sigma: float, radii: ArrayLike, batch: int, *, bound: str = DEFAULT_BOUND,
                       stop: bool = True, num_classes: int | None = None,
                       **params: Any) -> SequentialResult:
    """CERTIFY with an adaptive number of estimation copies (module docstring), for one image.

    ``sample(m)`` returns the next m class labels of the image's noisy copies (a stream: copy
    indices continue across calls). The first n0 labels select cA (argmax of counts0, ties to
    the lowest class, as :func:`~densepure_core.certification.stats.certify_from_counts`); estimation copies
    are then drawn in batches of at most ``batch`` and the rule is consulted at each look
    (``params["looks"]`` for "staged", default :func:`geometric_looks`; every batch for
    "betabin"). So an adaptive run's first m estimation copies are a fixed run's first m.

    ``stop=False`` turns the rule off: exactly n_max estimation copies, one look at n_max. With
    ``bound="staged"`` that single look gets all of alpha, so the result (counts, bound, radius)
    equals fixed CERTIFY's on the same stream; with "betabin" the counts are equal and the bound
    is the (looser) mixture bound at n_max.

    Args:
        sample: m -> int array [m] of class labels >= 0.
        n0: selection copies, >= 1.
        n_max: the most estimation copies, >= 1.
        alpha: the failure probability of the certificate, in (0, 1).
        sigma: the smoothing noise level > 0.
        radii: the run's radius grid (e.g. ``config.DEFAULT_RADII``).
        batch: copies per draw (and the first look of the default staged schedule), >= 1.
        bound: "staged" (default) or "betabin".
        stop: apply the stopping rule (default) or draw n_max copies.
        num_classes: length of counts0/counts; default max label seen + 1.
        **params: the bound's parameters (``looks``, ``split``; or ``a``, ``b``).
    """
    n0 = _check_positive_int(n0, "n0")
    n_max = _check_positive_int(n_max, "n_max")
    batch = _check_positive_int(batch, "batch")
    alpha = float(_check_alpha(alpha))
    sigma = float(_check_sigma(sigma))
    _thresholds(radii, sigma)
    full = default_bound_params(bound, batch, n_max)
    if bound == "staged" and not stop:
        full["looks"] = [n_max]
    full.update(params)
    full = _check_params(bound, full)
    if bound == "staged":
        looks = tuple(full["looks"])
        if looks[-1] != n_max:
            raise ValueError(f"the last look must be n_max = {n_max}, got {looks}")
    else:
        looks = batch_looks(batch, n_max)
    schedule = looks if stop else (n_max,)

    labels0 = _draw(sample, n0)
    c_a = int(np.argmax(np.bincount(labels0)))  # first maximum: ties to the lowest class
    est: list[np.ndarray] = []
    n = n_a = 0
    taken: list[int] = []
    lower = upper = 0.0
    reason = _NMAX
    for look in schedule:
        while n < look:
            m = min(batch, look - n)
            batch_labels = _draw(sample, m)
            est.append(batch_labels)
            n_a += int(np.count_nonzero(batch_labels == c_a))
            n += m
        taken.append(n)
        lower, upper, code = evaluate_look(n_a, n, alpha, sigma, radii, n_max, looks, bound, stop, **full)
        if code != _CONTINUE:
            reason = code
            break

    labels = np.concatenate(est)
    size = max(int(labels0.max()), int(labels.max())) + 1
    if num_classes is not None:
        if num_classes < size:
            raise ValueError(f"num_classes = {num_classes} but a label {size - 1} was drawn")
        size = int(num_classes)
    certified = lower >= 0.5
    return SequentialResult(
        prediction=c_a if certified else ABSTAIN,
        radius=float(certified_radius(sigma, lower)) if certified else 0.0,
        n_used=n, n_a=n_a,
        counts0=np.bincount(labels0, minlength=size).astype(np.int64),
        counts=np.bincount(labels, minlength=size).astype(np.int64),
        p_a_lower=lower, p_a_upper=upper, looks=tuple(taken), alpha=alpha, bound=bound,
        bound_params=full, stop_reason=STOP_REASONS[reason])


# --------------------------------------------------------------------------------------------
# measured savings (docs/sequential.md): python -m densepure_core.certification.sequential
# --------------------------------------------------------------------------------------------

def _savings_table(reps: int = 2000, seed: int = 0) -> str:  # pragma: no cover - a report
    from densepure_core.certification.stats import DEFAULT_RADII
    n_max, alpha, sigma, batch = 10_000, 0.001, 0.5, 100
    p_values = [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]
    rng = np.random.default_rng(seed)
    thr = _thresholds(DEFAULT_RADII, sigma)
    fixed_looks = (n_max,)
    configs = [("staged (default)", "staged", geometric_looks(batch, n_max), {"split": "equal"}),
               ("staged/late", "staged", geometric_looks(batch, n_max), {"split": "late"}),
               ("staged/ratio 2", "staged", geometric_looks(batch, n_max, 2), {"split": "equal"}),
               ("betabin(1/2,1/2)", "betabin", batch_looks(batch, n_max), {"a": 0.5, "b": 0.5})]
    lines = [f"n0=100 (cA assumed correct), n_max={n_max}, alpha={alpha}, sigma={sigma}, "
             f"batch={batch}, radii=DEFAULT_RADII, {reps} runs per pA",
             "pA | fixed: mean radius, bucket | " + " | ".join(
                 f"{name}: mean n_used, mean radius, same bucket as fixed" for name, *_ in configs)]
    for p in p_values:
        inc_fixed = rng.binomial(n_max, p, size=(reps, 1))
        fx = simulate_sequential(inc_fixed, fixed_looks, alpha, sigma, DEFAULT_RADII, "staged",
                                 stop=False, looks=list(fixed_looks))
        fx_rad = certified_radius(sigma, fx["lower"])
        fx_b = np.searchsorted(thr, fx["lower"], side="right")
        row = [f"{p}", f"{fx_rad.mean():.3f}, {np.bincount(fx_b).argmax()}"]
        for _name, bnd, lk, extra in configs:
            lk_arr = np.asarray(lk)
            inc = rng.binomial(np.diff(np.concatenate([[0], lk_arr])), p, size=(reps, lk_arr.size))
            kw = dict(extra, looks=list(lk)) if bnd == "staged" else extra
            out = simulate_sequential(inc, lk, alpha, sigma, DEFAULT_RADII, bnd, **kw)
            rad = certified_radius(sigma, out["lower"])
            b = np.searchsorted(thr, out["lower"], side="right")
            same = np.mean(b == np.bincount(fx_b).argmax())
            row.append(f"{out['n_used'].mean():.0f}, {rad.mean():.3f}, {same:.2f}")
        lines.append(" | ".join(row))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(_savings_table())
