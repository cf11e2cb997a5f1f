"""Adaptive (per-image) sample size for CERTIFY with an anytime-valid guarantee.

Fixed CERTIFY (Cohen et al. 2019; :func:`densepure_core.certification.stats.certify_from_counts`) spends the
same n estimation copies on every image. Here the n0 selection copies choose cA as before; the
estimation copies are then drawn in batches and, at each *look*, an anytime-valid bound gives
``[lower, upper]`` for pA = P(f(x + e) = cA). With ``i`` the largest grid index whose radius the
lower bound certifies (``lower >= Phi(r_i / sigma)``; the abstain bucket lies below r_0, whose
threshold is 1/2), an image stops at the first look where (:class:`StoppingRule`)

1. ``upper < 1/2``: it can only abstain (reason ``"abstain"``);
2. ``upper < Phi(r_{i+1} / sigma)``: the next radius is ruled out (``"upper"``);
3. ``r_{i+1}`` is out of reach even if every remaining copy votes cA, at every later look
   (``"unreachable"``);
4. *futility* (``futility > 0``): the predictive probability that the copies still to come
   reach ``r_{i+1}`` at n_max is below ``futility`` (``"futile"``; :func:`predictive_reach`);
5. ``r_i`` is the largest grid radius (``"top"``);
6. ``n_max`` estimation copies are spent (``"n_max"``).

The certified radius is ``sigma * Phi^-1(lower)`` at the stop (abstain, radius 0, when
``lower < 1/2``, exactly like fixed CERTIFY).

Guarantee: every bound below satisfies ``P(exists look k: lower_k > pA) <= alpha``. The stopping
look is one of the looks, so with probability at least 1 - alpha the returned certificate is
correct, *whatever rule chose the stop* (this rule, an adversarial one, or a person looking at
the counts). The upper bound and the futility rule only steer the stopping, never the
certificate, so neither enters the guarantee.

Bounds (``bound=``):

``"hybrid"`` (default): the one-sided mixture below at ``(1 - final) alpha`` at every look, and at
n_max also Clopper-Pearson at ``final * alpha`` (default ``final = 0.75``); the lower bound at
n_max is the larger of the two. Union bound: the mixture fails at some n with probability at
most ``(1 - final) alpha``, the fixed-n CP bound at n_max with at most ``final * alpha``. Looks are
every ``batch`` copies (free for the mixture). A run to n_max thus keeps 3/4 of alpha for a
fixed-n bound, so it loses (almost) nothing against fixed CERTIFY: on the default grid at
n = 10^4 the count CERTIFY needs for radius 1.5 at sigma 0.5 is unchanged down to 0.71 alpha.

``"onesided"``: the one-sided (truncated) beta-binomial mixture of Howard, Ramdas, McAuliffe,
Sekhon ("Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021;
confseq's ``beta_binomial_log_mixture(..., is_one_sided=True)``). For a lower bound only
alternatives q > p matter, so the mixing prior is restricted to [p, 1] and renormalized:

    M_n(p) = [int_p^1 q^S (1 - q)^(n - S) pi(q) dq / int_p^1 pi(q) dq] / (p^S (1 - p)^(n - S)),

with S = nA and pi = Beta(a, b). Under pA = p every likelihood ratio (q/p)^S ((1-q)/(1-p))^(n-S)
is a nonnegative martingale with mean 1, so is their mixture, and Ville's inequality gives
``P(exists n: M_n(pA) >= 1/alpha) <= alpha``; ``lower = inf {p : M_n(p) < 1/alpha}``. Howard et
al. center a Beta prior on p with a width tuned to a target sample size; here the prior is one
fixed Beta(a, b), a = b = 1/2 (Jeffreys) by default, which makes log M_n strictly decreasing on
``(0, (S - 1) / n]`` whenever ``a, b <= 1`` (proof in :func:`_onesided_lower`), so the
bisection returns the exact infimum. Truncation is what makes it tight near pA = 1: with
all n copies correct it needs about ``log(1/alpha) + 1.2`` nats whatever n (the two-sided
mixture pays ``log sqrt(pi n)``, 5.2 nats at n = 10^4).

``"staged"``: Clopper-Pearson at looks fixed in advance, alpha split across them by a union bound:
look ``k`` (at ``looks[k]`` estimation copies) uses ``clopper_pearson_lower(nA, looks[k], alpha *
w_k)`` with ``sum_k w_k = 1``. ``split="equal"``: ``alpha / K`` to each of the K looks (as
Horvath et al., ICLR 2022, "Boosting randomized smoothing with variance reduced classifiers", do
with their stages); ``split="late"``: the last look (``n_max``) alpha / 2 and the others
``alpha / (2 (K - 1))`` each. Schedule: geometric, ratio 1.5 (:func:`geometric_looks`), so
``batch, 2 batch, 3 batch, 5 batch, 8 batch, ...``, then ``n_max``. With one look it *is* fixed
CERTIFY. (The default before the rule of issue 25.)

``"betabin"``: Robbins' (1970) two-sided beta-binomial mixture confidence sequence,

    M_n(p) = B(a + S, b + n - S) / B(a, b) / (p^S (1 - p)^(n - S)),

the untruncated form of the mixture above (``{p : M_n(p) < 1/alpha}`` is an interval; Jeffreys'
a = b = 1/2 by default: with nA = n the bound is CP at about ``alpha / sqrt(pi n)``). Valid, and
looser than ``onesided`` for a lower bound: it also guards against pA above the estimate.

Which bound and rule are the default, and why: docs/sequential.md (measured by
``benchmarks/adaptive.py``).

Re-evaluation from stored fields: :func:`anytime_lower_bound` recomputes the bound from
``(n_a, n_used, alpha, bound, params)`` alone; ``params`` is :attr:`SequentialResult.bound_params`
(JSON-able: ``{"a", "b", "final", "n_max"}``, ``{"a", "b"}`` or ``{"looks", "split"}``). The
guarantee covers every look, so only the stop matters, and it holds at any alpha fixed without
looking at the results.

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

import json
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
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
    "DEFAULT_FINAL",
    "DEFAULT_FUTILITY",
    "STOP_REASONS",
    "SequentialResult",
    "StoppingRule",
    "geometric_looks",
    "batch_looks",
    "default_bound_params",
    "default_schedule",
    "look_alphas",
    "clopper_pearson_upper",
    "onesided_log_mixture",
    "anytime_lower_bound",
    "anytime_upper_bound",
    "min_counts",
    "predictive_reach",
    "simulate_sequential",
    "sequential_certify",
]

BOUNDS = ("staged", "betabin", "onesided", "hybrid")
#: The bound name stored with fixed-sampling votes: Clopper-Pearson at a fixed n
#: (:func:`densepure_core.certification.stats.clopper_pearson_lower`); never valid for adaptive rows.
FIXED_BOUND = "clopper-pearson"
DEFAULT_BOUND = "hybrid"
#: hybrid: the share of alpha kept for the Clopper-Pearson bound at n_max.
DEFAULT_FINAL = 0.75
#: The futility threshold of the default rule (0 turns futility off).
DEFAULT_FUTILITY = 0.1
SPLITS = ("late", "equal")
#: Stop-reason codes of :class:`StoppingRule` (index = code); code 0 means "continue".
STOP_REASONS = ("continue", "abstain", "upper", "unreachable", "top", "n_max", "futile")
_CONTINUE, _ABSTAIN, _UPPER, _UNREACHABLE, _TOP, _NMAX, _FUTILE = range(7)
_BISECT_STEPS = 64  # enough to reach adjacent doubles on [0, 1]
_PREDICTIVE_POINTS = 16  # posterior quantiles averaged by predictive_reach


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
    if bound in ("betabin", "onesided"):
        return {"a": 0.5, "b": 0.5}
    if bound == "hybrid":
        return {"a": 0.5, "b": 0.5, "final": DEFAULT_FINAL, "n_max": int(n_max)}
    raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")


def default_schedule(bound: str, batch: int, n_max: int, params: dict[str, Any] | None = None
                     ) -> tuple[int, ...]:
    """The looks at which the rule is consulted: staged: its ``looks``; the mixtures: every batch."""
    if bound == "staged":
        return tuple(int(v) for v in (params or default_bound_params(bound, batch, n_max))["looks"])
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    return batch_looks(batch, n_max)


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


def _check_prior(bound: str, params: dict[str, Any], at_most_one: bool) -> tuple[float, float]:
    a, b = float(params.get("a", 0.5)), float(params.get("b", 0.5))
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{bound} prior a, b must be finite and > 0, got {a!r}, {b!r}")
    if at_most_one and (a > 1 or b > 1):
        raise ValueError(f"{bound} prior a, b must lie in (0, 1] (the bound's bisection relies on it), "
                         f"got a = {a!r}, b = {b!r}; use e.g. the default a = b = 0.5")
    return a, b


def _check_params(bound: str, params: dict[str, Any]) -> dict[str, Any]:
    allowed = {"staged": {"looks", "split"}, "betabin": {"a", "b"}, "onesided": {"a", "b"},
               "hybrid": {"a", "b", "final", "n_max"}}
    if bound not in allowed:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    extra = set(params) - allowed[bound]
    if extra:
        raise ValueError(f"{bound} takes params {sorted(allowed[bound])}, got {sorted(params)}")
    if bound == "staged":
        if "looks" not in params:
            raise ValueError(f"staged takes params looks (required) and split, got {sorted(params)}")
        return {"looks": [int(v) for v in _check_looks(params["looks"])],
                "split": params.get("split", "equal")}
    a, b = _check_prior(bound, params, at_most_one=bound != "betabin")
    if bound != "hybrid":
        return {"a": a, "b": b}
    if "n_max" not in params:
        raise ValueError("hybrid takes params n_max (required: where its Clopper-Pearson look is), "
                         f"final, a, b; got {sorted(params)}")
    final = float(params.get("final", DEFAULT_FINAL))
    if not 0.0 < final < 1.0:
        raise ValueError(f"hybrid final (the share of alpha at n_max) must lie in (0, 1), got {final!r}")
    return {"a": a, "b": b, "final": final, "n_max": _check_positive_int(params["n_max"], "n_max")}


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


def onesided_log_mixture(n_a: ArrayLike, n: ArrayLike, p: ArrayLike, a: float = 0.5,
                         b: float = 0.5) -> np.ndarray:
    """log M_n(p) of the one-sided (truncated) beta-binomial mixture, for 0 < p < 1.

    ``M_n(p) = B(a + S, b + n - S) I_{1-p}(b + n - S, a + S) / (B(a, b) I_{1-p}(b, a))
    / (p^S (1 - p)^(n - S))`` with S = ``n_a`` and I the regularized incomplete beta function:
    the Beta(a, b) mixture of the likelihood ratios of q against p over q in [p, 1] (module
    docstring). It is Howard et al.'s ``log_superMG`` of ``BetaBinomialMixture`` (confseq,
    ``is_one_sided=True``) with their p-dependent prior replaced by a fixed Beta(a, b); -inf
    where p is so far above S/n that the truncated integral underflows. Vectorized.
    """
    s, n, p = np.broadcast_arrays(np.asarray(n_a, np.float64), np.asarray(n, np.float64),
                                  np.asarray(p, np.float64))
    with np.errstate(divide="ignore"):
        num = special.betaln(a + s, b + n - s) + np.log(special.betainc(b + n - s, a + s, 1.0 - p))
        den = special.betaln(a, b) + np.log(special.betainc(b, a, 1.0 - p))
        return num - den - s * np.log(p) - (n - s) * np.log1p(-p)


def _onesided_lower(s: np.ndarray, n: np.ndarray, alpha: np.ndarray, a: float, b: float) -> np.ndarray:
    """inf {p : M_n(p) < 1/alpha} of the one-sided mixture, exactly, by bisection.

    Why bisection finds the infimum: with D(p) = int_p^1 pi and h = pi / D (pi the prior density),

        d log M_n / dp = h(p) (1 - 1/M_n(p)) - n (S/n - p) / (p (1 - p)).

    For a, b <= 1, D(p) >= int_p^1 (1 - q)^(b-1) dq = (1 - p)^b / b, so h(p) p (1 - p) <= b p^a
    <= 1, and the derivative is negative wherever n (S/n - p) >= 1: log M_n is strictly
    decreasing on (0, hi], hi = (S - 1) / n. So if M_n(hi) < 1/alpha the set's infimum is the one
    crossing in (0, hi) (found to adjacent doubles, returned on the outside); otherwise
    M_n >= 1/alpha on all of (0, hi] and hi itself is returned, a value at or below the
    infimum. Either way the result is valid; S <= 1 gives 0.
    """
    s, n, alpha = np.broadcast_arrays(s.astype(np.float64), n.astype(np.float64), alpha)
    level = -np.log(alpha)
    hi = np.maximum((s - 1.0) / n, 0.0)
    live = hi > 0.0
    p_hi = np.where(live, hi, 0.5)
    at_hi = live & (onesided_log_mixture(s, n, p_hi, a, b) >= level)
    out_pt, in_pt = np.zeros_like(hi), hi.copy()
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (out_pt + in_pt)
        ok = live & (mid > 0.0)
        outside = ok & (onesided_log_mixture(s, n, np.where(ok, mid, 0.5), a, b) >= level)
        out_pt = np.where(outside, mid, out_pt)
        in_pt = np.where(outside, in_pt, mid)
    return np.where(at_hi, hi, np.where(live, out_pt, 0.0))


def _per_look_alpha(n: np.ndarray, alpha: np.ndarray, bound: str, params: dict[str, Any]) -> np.ndarray:
    """The alpha each element's bound is computed at (staged: its look's share)."""
    if bound == "staged":
        looks = np.asarray(params["looks"], dtype=np.int64)
        idx = np.searchsorted(looks, n)
        on_look = (idx < looks.size) & (looks[np.minimum(idx, looks.size - 1)] == n)
        if not np.all(on_look):
            raise ValueError("staged bound: every n must be one of the looks fixed in advance "
                             f"{params['looks']}, got n = {np.unique(n[~on_look])[:5]}")
        return alpha * _look_weights(looks.size, params["split"])[np.minimum(idx, looks.size - 1)]
    if bound == "hybrid":
        if np.any(n > params["n_max"]):
            raise ValueError(f"hybrid bound: n must be <= its n_max = {params['n_max']}, got "
                             f"n = {np.unique(n[n > params['n_max']])[:5]}")
        return alpha * (1.0 - params["final"])
    return alpha


def _prepare(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike, bound: str,
             params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Validated, broadcast (n_a, n, alpha, per-element alpha of the look, params)."""
    n_a, n, alpha = _check_binomial(n_a, n, alpha)
    params = _check_params(bound, params)
    return n_a, n, alpha, _per_look_alpha(n, alpha, bound, params), params


def anytime_lower_bound(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike, bound: str = DEFAULT_BOUND,
                        **params: Any) -> np.ndarray:
    """Anytime-valid (1 - alpha) lower bound on pA from nA votes in n estimation copies.

    Vectorized over numpy arrays (``n_a``, ``n``, ``alpha`` broadcast). This is the function to
    call when re-certifying from stored fields: ``n_a`` (votes for cA), ``n`` (= ``n_used``),
    ``alpha``, ``bound`` and ``params`` (= the stored ``bound_params``):

    ``"hybrid"``: ``a``, ``b``, ``final``, ``n_max`` (required): the one-sided mixture at
    ``(1 - final) alpha``; at n = n_max the larger of that and
    ``clopper_pearson_lower(n_a, n_max, final * alpha)``; n > n_max is refused.
    ``"onesided"``: ``a``, ``b`` in (0, 1] (default 1/2, 1/2): the truncated mixture; any n.
    ``"staged"``: ``looks`` (the schedule fixed in advance, required) and ``split``:
    ``clopper_pearson_lower(n_a, n, alpha * w_k)`` where n = looks[k]; every n must be a look.
    ``"betabin"``: ``a``, ``b`` (default 1/2, 1/2): the two-sided mixture's lower end; any n.

    Guarantee: for any stopping time tau (on the schedule's looks for "staged"),
    ``P(lower(nA_tau, tau) > pA) <= alpha``, because ``P(exists look: lower > pA) <= alpha``.
    """
    n_a, n, alpha, a_look, params = _prepare(n_a, n, alpha, bound, params)
    if bound == "staged":
        return clopper_pearson_lower(n_a, n, a_look)
    if bound == "betabin":
        return _betabin_bounds(n_a, n, a_look, params["a"], params["b"], "lower")
    lower = _onesided_lower(n_a, n, a_look, params["a"], params["b"])
    if bound == "hybrid":
        last = n == params["n_max"]
        if np.any(last):
            cp = clopper_pearson_lower(n_a, n, alpha * params["final"])
            lower = np.where(last, np.maximum(lower, cp), lower)
    return lower


def anytime_upper_bound(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike, bound: str = DEFAULT_BOUND,
                        **params: Any) -> np.ndarray:
    """The matching upper bound (it only steers the stopping; see the module docstring).

    The mixtures' upper bound is the mirror image of their lower bound (failures, prior
    Beta(b, a)); hybrid's at n_max is the smaller of that and Clopper-Pearson's at
    ``final * alpha``.
    """
    n_a, n, alpha, a_look, params = _prepare(n_a, n, alpha, bound, params)
    if bound == "staged":
        return clopper_pearson_upper(n_a, n, a_look)
    if bound == "betabin":
        return _betabin_bounds(n_a, n, a_look, params["a"], params["b"], "upper")
    upper = 1.0 - _onesided_lower(n - n_a, n, a_look, params["b"], params["a"])
    if bound == "hybrid":
        last = n == params["n_max"]
        if np.any(last):
            upper = np.where(last, np.minimum(upper, clopper_pearson_upper(n_a, n, alpha * params["final"])), upper)
    return upper


def _first_count(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], looks: np.ndarray,
                 targets: np.ndarray, strict: bool) -> np.ndarray:
    """[K, T]: the smallest S in 0..n_k with fn(S, n_k) >= targets[t] (> if strict), n_k + 1 if none.

    ``fn`` must be nondecreasing in S (every bound here is). Integer bisection, vectorized.
    """
    n = np.broadcast_to(looks[:, None], (looks.size, targets.size)).astype(np.int64)
    lo, hi = np.zeros_like(n), n + 1  # the answer lies in [lo, hi]; hi = n + 1: none
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        value = fn(np.minimum(mid, n), n)
        ok = (value > targets) if strict else (value >= targets)
        ok &= mid <= n
        move = lo < hi
        hi = np.where(move & ok, mid, hi)
        lo = np.where(move & ~ok, mid + 1, lo)
    return hi


def min_counts(schedule: Sequence[int], thresholds: ArrayLike, alpha: float, bound: str = DEFAULT_BOUND,
               strict: bool = False, **params: Any) -> np.ndarray:
    """[K, T] int64: the fewest votes for cA at look k whose lower bound reaches threshold t.

    ``lower(S, schedule[k]) >= thresholds[t]`` (``>`` when ``strict``) holds exactly when
    ``S >= out[k, t]`` (the bound is nondecreasing in S); ``schedule[k] + 1`` where no S does. The
    stopping rule reads certified buckets off this table, and the validity tests ask "did the
    bound exceed pA at some look" with ``strict=True``.
    """
    looks_arr = _check_looks(schedule)
    targets = np.asarray(thresholds, dtype=np.float64)[None, :]
    return _first_count(lambda s, n: anytime_lower_bound(s, n, alpha, bound, **params), looks_arr,
                        targets, strict)


def predictive_reach(n_a: ArrayLike, n: ArrayLike, need: ArrayLike, n_max: int,
                     points: int = _PREDICTIVE_POINTS) -> np.ndarray:
    """P(n_a + X >= need), X ~ Binomial(n_max - n, p), p ~ Beta(n_a + 1/2, n - n_a + 1/2).

    The posterior predictive probability, under Jeffreys' prior, that the copies still to come
    bring the votes for cA to ``need`` by n_max: the futility rule's estimate of how likely the
    next radius still is. Computed as the mean of the binomial tail (``scipy.special.bdtrc``) over
    ``points`` posterior quantiles at (i + 1/2) / points, a midpoint rule accurate to about
    0.01 here (``scipy.stats.betabinom.sf`` is exact but took ~40 s for 20,000 images on the
    development machine, at every look). It only steers the stopping. Vectorized.
    """
    s, n, need = np.broadcast_arrays(np.asarray(n_a, np.float64), np.asarray(n, np.float64),
                                     np.asarray(need, np.float64))
    rem = n_max - n
    q = (np.arange(points) + 0.5) / points
    p = special.betaincinv(s[..., None] + 0.5, n[..., None] - s[..., None] + 0.5, q)
    k = np.clip(need - s - 1.0, 0.0, np.maximum(rem, 0.0))[..., None]  # X > k  <=>  X >= need - s
    tail = special.bdtrc(k, np.maximum(rem, 0.0)[..., None], p).mean(axis=-1)
    return np.where(need - s <= 0, 1.0, np.where(need - s > rem, 0.0, tail))


# --------------------------------------------------------------------------------------------
# the stopping rule
# --------------------------------------------------------------------------------------------

def _thresholds(radii: ArrayLike, sigma: float) -> np.ndarray:
    """pA thresholds: 1/2 (certify at all), then Phi(r / sigma) for each grid radius r > 0."""
    r = np.unique(np.asarray(radii, dtype=np.float64))
    if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"radii must be a non-empty list of finite radii >= 0, got {radii!r}")
    return np.concatenate([[0.5], special.ndtr(r[r > 0] / sigma)])


@lru_cache(maxsize=32)
def _rule_tables(key: tuple) -> dict[str, np.ndarray]:
    """The count tables of a :class:`StoppingRule` (cached: a rule is rebuilt per image and per test).

    ``need`` [K, T]: the fewest votes for cA that certify threshold t at look k (n_k + 1: never);
    ``below``: the most votes whose upper bound stays below t; ``slack``: min over later looks m
    of need[m, t] - n_m (+inf after the last); ``hopeful``: the fewest votes whose
    :func:`predictive_reach` of need[-1, t] at n_max is at least the futility threshold.
    """
    alpha, sigma, radii, n_max, schedule, bound, params_json, futility = key
    params = json.loads(params_json)
    looks = np.asarray(schedule, dtype=np.int64)
    thr = _thresholds(radii, sigma)
    need = min_counts(looks, thr, alpha, bound, **params)
    below = _first_count(lambda s, n: anytime_upper_bound(s, n, alpha, bound, **params), looks,
                         thr[None, :], strict=False) - 1
    slack = np.full(need.shape, np.inf)
    gap = need - looks[:, None]
    for k in range(looks.size - 2, -1, -1):
        slack[k] = np.minimum(slack[k + 1], gap[k + 1])
    hopeful = np.zeros_like(need)
    if futility > 0:
        final = need[-1][None, :].astype(np.float64)
        hopeful = _first_count(lambda s, n: predictive_reach(s, n, final, n_max), looks,
                               np.full((1, thr.size), futility), strict=False)
    for table in (need, below, slack, hopeful):
        table.setflags(write=False)
    return {"need": need, "below": below, "slack": slack, "hopeful": hopeful}


@dataclass(frozen=True, eq=False)
class StoppingRule:
    """Where an image stops (module docstring), read off count tables built once per rule.

    At look k (``schedule[k]`` estimation copies) with S votes for cA, the bucket is the number of
    thresholds S reaches (:func:`min_counts`), "upper" and "abstain" compare S with the largest
    count whose upper bound stays below a threshold, "unreachable" asks whether S plus every copy
    still to come reaches the next threshold's count at some later look, and futility compares S
    with the fewest votes whose :func:`predictive_reach` of the count the next threshold needs at
    n_max is at least ``futility``. Every quantity is monotone in S, so the tables give the same
    decisions as evaluating the bounds and the predictive probability at the look (they are
    built from them), at a fraction of the cost: the simulations run 20,000 images x 100
    looks in seconds.

    Attributes:
        alpha, sigma, radii: the rule's alpha and radius grid.
        n_max: the most estimation copies; the schedule's last look.
        schedule: the looks, strictly increasing (staged: a subset of its ``looks``).
        bound, params: the anytime bound (:func:`anytime_lower_bound`).
        futility: stop when the predictive probability of reaching the next radius at n_max is
            below this (0: no futility stop).
        stop: False: no stopping rule at all, the only stop is n_max.
    """

    alpha: float
    sigma: float
    radii: tuple[float, ...]
    n_max: int
    schedule: tuple[int, ...]
    bound: str = DEFAULT_BOUND
    params: dict[str, Any] = field(default_factory=dict)
    futility: float = 0.0
    stop: bool = True

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        _check_sigma(self.sigma)
        looks = _check_looks(self.schedule)
        if looks[-1] != self.n_max:
            raise ValueError(f"the last look must be n_max = {self.n_max}, got {looks[-1]}")
        if not 0.0 <= float(self.futility) < 1.0:
            raise ValueError(f"futility must lie in [0, 1), got {self.futility!r}")
        _check_params(self.bound, self.params)
        # every look must be one the bound accepts (staged: fixed in advance; hybrid: <= n_max)
        anytime_lower_bound(np.zeros(looks.size, np.int64), looks, self.alpha, self.bound, **self.params)

    @cached_property
    def thresholds(self) -> np.ndarray:
        """[T]: 1/2, then Phi(r / sigma) for every grid radius r > 0, ascending."""
        return _thresholds(self.radii, float(self.sigma))

    @cached_property
    def _looks(self) -> np.ndarray:
        return np.asarray(self.schedule, dtype=np.int64)

    @cached_property
    def _tables(self) -> dict[str, np.ndarray]:
        key = (float(self.alpha), float(self.sigma), tuple(float(r) for r in self.radii), int(self.n_max),
               tuple(int(v) for v in self.schedule), self.bound, json.dumps(self.params, sort_keys=True),
               float(self.futility))
        return _rule_tables(key)

    @property
    def need(self) -> np.ndarray:
        """[K, T]: votes for cA that certify threshold t at look k (n_k + 1: never)."""
        return self._tables["need"]

    def decide(self, k: int, n_a: ArrayLike) -> np.ndarray:
        """Stop codes (:data:`STOP_REASONS`) at look ``k`` for images with ``n_a`` votes for cA.

        Vectorized over images. Precedence: abstain, upper, unreachable, futile, top, n_max.
        """
        s = _as_counts(n_a, "n_a")
        n, last = int(self._looks[k]), k == self._looks.size - 1
        code = np.full(s.shape, _NMAX if last else _CONTINUE, dtype=np.int64)
        if not self.stop:
            return code
        t_count = self.thresholds.size
        bucket = np.searchsorted(self.need[k], s, side="right")  # thresholds certified
        top = bucket == t_count
        nxt = np.minimum(bucket, t_count - 1)
        abstain = s <= self._tables["below"][k, 0]
        upper = ~top & (s <= self._tables["below"][k, nxt])
        unreachable = ~top & (s - n < self._tables["slack"][k, nxt]) & (not last)
        code[top] = _TOP
        if self.futility > 0 and not last:
            code[~top & (s < self._tables["hopeful"][k, nxt])] = _FUTILE
        code[unreachable] = _UNREACHABLE
        code[upper] = _UPPER
        code[abstain] = _ABSTAIN
        return code

    def evaluate(self, n_a: int, n: int) -> tuple[float, float, int]:
        """One image at a look: (lower, upper, stop code); ``n`` must be a look of the schedule.

        The one place where a look is evaluated, by :func:`sequential_certify` and by the engine
        (``smoothing/adaptive.py``).
        """
        k = int(np.searchsorted(self._looks, n))
        if k >= self._looks.size or self._looks[k] != n:
            raise ValueError(f"n = {n} is not a look of the schedule {self.schedule}")
        lower = float(anytime_lower_bound(n_a, n, self.alpha, self.bound, **self.params))
        upper = float(anytime_upper_bound(n_a, n, self.alpha, self.bound, **self.params))
        return lower, upper, int(self.decide(k, np.asarray([n_a]))[0])


# --------------------------------------------------------------------------------------------
# vectorized simulation (tests, benchmarks): many independent runs at once
# --------------------------------------------------------------------------------------------

def simulate_sequential(increments: ArrayLike, schedule: Sequence[int], alpha: float, sigma: float,
                        radii: ArrayLike, bound: str = DEFAULT_BOUND, stop: bool = True,
                        futility: float = 0.0, **params: Any) -> dict[str, np.ndarray]:
    """Run the stopping rule on R runs at once, given each run's cA votes between looks.

    ``increments[r, k]`` = votes for cA among the copies between look k - 1 and look k of
    ``schedule`` (e.g. ``rng.binomial(np.diff([0, *schedule]), pA, size=(R, K))``); for "staged"
    the schedule is also the bound's ``looks`` unless ``params`` gives them, for "hybrid" its
    last look is the bound's ``n_max`` unless given. Returns arrays of length R: ``n_used``,
    ``n_a``, ``lower``, ``upper`` (the bounds at the stop, computed exactly), ``reason`` (codes
    into :data:`STOP_REASONS`) and ``bucket`` (thresholds certified: 0 abstains, 1 certifies
    radius 0, i + 1 the i-th grid radius).
    """
    inc = _as_counts(increments, "increments")
    looks_arr = _check_looks(schedule)
    if bound == "staged" and "looks" not in params:
        params = dict(params, looks=[int(v) for v in looks_arr])
    if bound == "hybrid" and "n_max" not in params:
        params = dict(params, n_max=int(looks_arr[-1]))
    if inc.ndim != 2 or inc.shape[1] != looks_arr.size:
        raise ValueError(f"increments must be [R, {looks_arr.size}], got {inc.shape}")
    rule = StoppingRule(float(alpha), float(sigma), tuple(np.asarray(radii, np.float64).tolist()),
                        int(looks_arr[-1]), tuple(int(v) for v in looks_arr), bound, params,
                        float(futility), stop)
    cum = np.cumsum(inc, axis=1)
    r_count, k_count = cum.shape
    stop_at = np.full(r_count, k_count - 1)
    reason = np.full(r_count, _NMAX)
    active = np.arange(r_count)
    for k in range(k_count):
        if active.size == 0:
            break
        code = rule.decide(k, cum[active, k])
        done = code != _CONTINUE
        stop_at[active[done]], reason[active[done]] = k, code[done]
        active = active[~done]
    rows = np.arange(r_count)
    n_used, n_a = looks_arr[stop_at], cum[rows, stop_at]
    bucket = (n_a[:, None] >= rule.need[stop_at]).sum(axis=1)
    # the exact bounds at the stop, once per distinct (n_a, n_used): runs share few of them
    pairs, inverse = np.unique(np.stack([n_a, n_used]), axis=1, return_inverse=True)
    lower = anytime_lower_bound(pairs[0], pairs[1], alpha, bound, **params)[inverse.ravel()]
    upper = anytime_upper_bound(pairs[0], pairs[1], alpha, bound, **params)[inverse.ravel()]
    return {"n_used": n_used, "n_a": n_a, "lower": lower, "upper": upper, "reason": reason, "bucket": bucket}


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
        bound: one of :data:`BOUNDS`.
        bound_params: JSON-able parameters of the bound (re-evaluate with
            ``anytime_lower_bound(n_a, n_used, alpha, bound, **bound_params)``).
        stop_reason: one of "abstain", "upper", "unreachable", "futile", "top", "n_max".
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


def sequential_certify(sample: Callable[[int], ArrayLike], n0: int, n_max: int, alpha: float,
                       sigma: float, radii: ArrayLike, batch: int, /, *, bound: str = DEFAULT_BOUND,
                       stop: bool = True, futility: float = DEFAULT_FUTILITY,
                       num_classes: int | None = None, **params: Any) -> SequentialResult:
    """CERTIFY with an adaptive number of estimation copies (module docstring), for one image.

    ``sample(m)`` returns the next m class labels of the image's noisy copies (a stream: copy
    indices continue across calls). The first n0 labels select cA (argmax of counts0, ties to
    the lowest class, as :func:`~densepure_core.certification.stats.certify_from_counts`); estimation copies
    are then drawn in batches of at most ``batch`` and the rule is consulted at each look
    (:func:`default_schedule`: every batch; staged: ``params["looks"]``, default
    :func:`geometric_looks`). So an adaptive run's first m estimation copies are a fixed run's
    first m.

    ``stop=False`` turns the rule off: exactly n_max estimation copies, one look at n_max. With
    ``bound="staged"`` that single look gets all of alpha, so the result (counts, bound, radius)
    equals fixed CERTIFY's on the same stream; with the mixtures the counts are equal and the
    bound is theirs at n_max (never above fixed CERTIFY's by more than its alpha share allows).

    Args:
        sample: m -> int array [m] of class labels >= 0.
        n0: selection copies, >= 1.
        n_max: the most estimation copies, >= 1.
        alpha: the failure probability of the certificate, in (0, 1).
        sigma: the smoothing noise level > 0.
        radii: the run's radius grid (e.g. ``config.DEFAULT_RADII``).
        batch: copies per draw (and the looks' spacing), >= 1.
        bound: one of :data:`BOUNDS` (default "hybrid").
        stop: apply the stopping rule (default) or draw n_max copies.
        futility: the futility threshold (default 0.1; 0: off).
        num_classes: length of counts0/counts; default max label seen + 1.
        **params: the bound's parameters (``looks``, ``split``; ``a``, ``b``; ``final``; hybrid's
            ``n_max`` is ``n_max``, and may be passed again, e.g. from stored ``bound_params``).
    """
    n0 = _check_positive_int(n0, "n0")
    n_max = _check_positive_int(n_max, "n_max")
    batch = _check_positive_int(batch, "batch")
    alpha = float(_check_alpha(alpha))
    sigma = float(_check_sigma(sigma))
    full = default_bound_params(bound, batch, n_max)
    if bound == "staged" and not stop:
        full["looks"] = [n_max]
    full.update(params)
    full = _check_params(bound, full)
    if bound == "hybrid" and full["n_max"] != n_max:
        raise ValueError(f"hybrid's n_max param ({full['n_max']}) must be the run's n_max = {n_max}")
    schedule = default_schedule(bound, batch, n_max, full) if stop else (n_max,)
    rule = StoppingRule(alpha, sigma, tuple(np.asarray(radii, np.float64).tolist()), n_max, schedule,
                        bound, full, float(futility), stop)

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
        lower, upper, code = rule.evaluate(n_a, n)
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
