"""Smoothing statistics: Clopper-Pearson bounds, CERTIFY and PREDICT from vote counts, radii.

Also the approximate and high-probability certified accuracy of a set of images.

This is the statistical core of randomized smoothing (Cohen, Rosenfeld, Kolter, ICML 2019). It
works on *stored vote counts* only, never on images or models, so a new alpha, a new sigma cap or
a new accuracy table can be derived from the raw evidence without a GPU. Every function is
vectorized over many images with numpy/scipy: no Python loop runs over images.

Notation: for one image, ``counts0[C]`` is the class histogram of the n0 *selection* copies and
``counts[C]`` the histogram of the n fresh *estimation* copies; cA = argmax counts0; nA =
counts[cA].

Guarantee of CERTIFY (Cohen et al., Theorem 1 + Prop. 2): with probability at least 1 - alpha
over the smoothing noise, if :func:`certify_from_counts` returns class cA with radius R, then the
smoothed classifier g satisfies g(x + d) = cA for every ||d||_2 < R.

Example:
    >>> import numpy as np
    >>> r = certify_from_counts(np.array([[2, 95, 3]]), np.array([[10, 980, 10]]), 0.5, 0.001)
    >>> int(r.prediction[0]), round(float(r.radius[0]), 3)
    (1, 0.889)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy import special
from scipy.stats import binom, norm

__all__ = [
    "ABSTAIN",
    "CertifyResult",
    "clopper_pearson_lower",
    "certified_radius",
    "certify_from_counts",
    "binomial_test_pvalue",
    "predict_from_counts",
    "certified_accuracy",
    "high_probability_certified_accuracy",
    "max_certifiable_radius",
    "wilson_interval",
    "paired_difference_interval",
    "DEFAULT_RADII",
]

ABSTAIN = -1  # the prediction recorded when CERTIFY or PREDICT abstains

#: The radius grid of accuracy tables (and of the adaptive stopping rule) unless a run sets its
#: own: Cohen et al.'s grid, extended to 4.0 (the cap at n = 10^5 is 3.81 sigma).
DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0]


# --------------------------------------------------------------------------------------------
# input validation (concise errors rather than silently correcting bad input)
# --------------------------------------------------------------------------------------------

def _as_counts(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as an int64 array of non-negative whole numbers, or a ValueError naming ``name``."""
    a = np.asarray(x)
    if a.dtype == bool:
        raise ValueError(f"{name} must hold integer counts, got a boolean array")
    if np.issubdtype(a.dtype, np.integer):
        out = a.astype(np.int64, copy=False)
    elif np.issubdtype(a.dtype, np.floating):
        # Counts read back from Parquet/CSV may arrive as floats; accept whole numbers only.
        if not (np.all(np.isfinite(a)) and np.all(a == np.floor(a))):
            raise ValueError(f"{name} must hold whole numbers, got non-integral values")
        out = a.astype(np.int64)
    else:
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    if np.any(out < 0):
        raise ValueError(f"{name} must be >= 0, got a minimum of {out.min()}")
    return out


def _check_alpha(alpha: ArrayLike, name: str = "alpha") -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)
    if not np.all((a > 0.0) & (a < 1.0)):  # also rejects NaN
        raise ValueError(f"{name} must lie in (0, 1), got {alpha!r}")
    return a


def _check_sigma(sigma: ArrayLike) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if not np.all(np.isfinite(s) & (s > 0.0)):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    return s


def _as_rows(x: ArrayLike, name: str) -> np.ndarray:
    """Counts as ``[N, C]``: a single image's ``[C]`` becomes ``[1, C]``."""
    a = _as_counts(x, name)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must have shape [N, C] or [C] with C >= 1, got {a.shape}")
    return a


# --------------------------------------------------------------------------------------------
# bounds and radii
# --------------------------------------------------------------------------------------------

def _check_binomial(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated, broadcast (n_a, n, alpha) of a binomial bound: 0 <= n_a <= n, n >= 1, alpha in (0, 1)."""
    n_a = _as_counts(n_a, "n_a")
    n = _as_counts(n, "n")
    alpha = _check_alpha(alpha)
    if np.any(n < 1):
        raise ValueError(f"n must be >= 1, got a minimum of {n.min()}")
    n_a, n, alpha = np.broadcast_arrays(n_a, n, alpha)
    if np.any(n_a > n):
        raise ValueError("n_a must be <= n for every element")
    return n_a, n, alpha


def clopper_pearson_lower(n_a: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound of a binomial proportion.

    The bound is the alpha quantile of Beta(n_a, n - n_a + 1), and exactly 0 when n_a = 0. It
    equals statsmodels' ``proportion_confint(n_a, n, alpha=2*alpha, method="beta")[0]`` (the
    call in Cohen's reference code); with n_a = n it is alpha ** (1 / n).

    Guarantee: if n_a ~ Binomial(n, p), then with probability at least 1 - alpha over n_a,
    ``clopper_pearson_lower(n_a, n, alpha) <= p``.

    Args:
        n_a: successes, integers with 0 <= n_a <= n; any shape broadcastable with ``n``, ``alpha``.
        n: trials, integers >= 1.
        alpha: one-sided error level, 0 < alpha < 1 (scalar or broadcastable array).

    Returns:
        float64 array of the broadcast shape of the inputs (0-d for scalar inputs).

    Raises:
        ValueError: naming ``n_a``, ``n`` or ``alpha`` when it is out of range.
    """
    n_a, n, alpha = _check_binomial(n_a, n, alpha)
    zero = n_a == 0
    # Beta(0, .) is degenerate (betaincinv returns NaN): feed a dummy 1 and overwrite with 0.
    a = np.where(zero, 1, n_a).astype(np.float64)
    lower = special.betaincinv(a, (n - n_a + 1).astype(np.float64), alpha)
    return np.where(zero, 0.0, lower).astype(np.float64)


def certified_radius(sigma: ArrayLike, p_a_lower: ArrayLike) -> np.ndarray:
    """Cohen's L2 radius sigma * Phi^-1(p_a_lower), or 0.0 where p_a_lower < 0.5.

    Guarantee (Cohen et al., Theorem 1): if P(f(x + e) = cA) >= p_a_lower >= 0.5 for
    e ~ N(0, sigma^2 I), then g(x + d) = cA for every ||d||_2 < the returned radius.

    Args:
        sigma: smoothing noise level(s) > 0, broadcastable with ``p_a_lower``.
        p_a_lower: lower bound(s) on the top-class probability, in [0, 1].

    Returns:
        float64 array of the broadcast shape; exactly 0.0 at p_a_lower = 0.5 and below.
    """
    sigma = _check_sigma(sigma)
    p = np.asarray(p_a_lower, dtype=np.float64)
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError(f"p_a_lower must lie in [0, 1], got {p_a_lower!r}")
    # Below 0.5 there is no certificate; clamp before ndtri so no -inf/NaN is ever computed.
    return np.where(p >= 0.5, sigma * special.ndtri(np.maximum(p, 0.5)), 0.0).astype(np.float64)


def max_certifiable_radius(sigma: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> np.ndarray:
    """The largest radius CERTIFY can return with n estimation copies: the cap at n_a = n.

    With n_a = n the Clopper-Pearson bound is alpha ** (1 / n), so the cap is
    sigma * Phi^-1(alpha ** (1 / n)): 3.20 sigma at n = 10^4 and 3.81 sigma at n = 10^5 for
    alpha = 0.001. No image can be certified beyond it, whatever the classifier.

    Args:
        sigma: noise level(s) > 0.
        n: number of estimation copies, integers >= 1.
        alpha: one-sided error level in (0, 1).

    Returns:
        float64 array of the broadcast shape of the inputs.
    """
    sigma = _check_sigma(sigma)
    n = _as_counts(n, "n")
    if np.any(n < 1):
        raise ValueError(f"n must be >= 1, got a minimum of {n.min()}")
    alpha = _check_alpha(alpha)
    # 1 - alpha**(1/n) = -expm1(log(alpha)/n), evaluated without cancellation; then
    # Phi^-1(1 - q) = -Phi^-1(q) keeps full precision even when alpha**(1/n) is near 1.
    q = -np.expm1(np.log(alpha) / n)
    return np.asarray(sigma * -special.ndtri(q), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# CERTIFY
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: element-wise array equality has no single truth value
class CertifyResult:
    """Per-image output of CERTIFY; every field is an array of shape [N].

    Attributes:
        prediction: int64, the certified class cA, or ABSTAIN (-1).
        n_a: int64, votes for cA among the n estimation copies.
        n: int64, number of estimation copies (the row sum of ``counts``).
        p_a_lower: float64, one-sided (1 - alpha) Clopper-Pearson lower bound of n_a / n.
        radius: float64, certified L2 radius; 0.0 where abstaining.
    """

    prediction: np.ndarray
    n_a: np.ndarray
    n: np.ndarray
    p_a_lower: np.ndarray
    radius: np.ndarray

    def __len__(self) -> int:
        return int(self.prediction.shape[0])


def certify_from_counts(counts0: ArrayLike, counts: ArrayLike, sigma: ArrayLike,
                        alpha: float) -> CertifyResult:
    """CERTIFY of Cohen et al. from per-class vote counts, for N images at once.

    cA = argmax counts0 (ties go to the lowest class index, as ``np.argmax``); n_a = counts[cA];
    n = counts.sum(); p_a_lower = clopper_pearson_lower(n_a, n, alpha). If p_a_lower < 0.5 the
    image abstains (prediction ABSTAIN, radius 0); otherwise it predicts cA with radius
    sigma * Phi^-1(p_a_lower).

    Guarantee: provided counts0 and counts come from independent noise draws, with probability
    at least 1 - alpha over the noise, if the result for an image is cA with radius R, then the
    smoothed classifier g(x + d) = cA for all ||d||_2 < R. (Selecting cA on counts0 and
    estimating on fresh counts is what makes the bound valid: never pass the same draws twice.)

    Args:
        counts0: int [N, C] (or [C] for one image), votes of the n0 selection copies; every row
            must hold at least one vote.
        counts: int [N, C] (or [C]), votes of the n estimation copies; every row must hold at
            least one vote.
        sigma: smoothing noise level > 0 (scalar, or [N] per image).
        alpha: one-sided error level in (0, 1), e.g. 0.001.

    Returns:
        CertifyResult with arrays of length N (length 1 for 1-D inputs).

    Raises:
        ValueError: if shapes differ, counts are negative/non-integral, a row is empty, or
            sigma/alpha is out of range.
    """
    c0 = _as_rows(counts0, "counts0")
    c = _as_rows(counts, "counts")
    if c0.shape != c.shape:
        raise ValueError(f"counts0 and counts must have the same shape, got counts0 {c0.shape} "
                         f"and counts {c.shape}")
    if np.any(c0.sum(axis=1) == 0):
        raise ValueError("every row of counts0 must hold at least one vote (n0 >= 1)")
    n = c.sum(axis=1)
    if np.any(n == 0):
        raise ValueError("every row of counts must hold at least one vote (n >= 1)")
    sigma = _check_sigma(sigma)
    _check_alpha(alpha)

    top = np.argmax(c0, axis=1)  # first maximum: ties go to the lowest class index
    n_a = np.take_along_axis(c, top[:, None], axis=1)[:, 0]
    p_a_lower = clopper_pearson_lower(n_a, n, alpha)
    certified = p_a_lower >= 0.5
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape != n.shape):
        raise ValueError(f"sigma must be a scalar or have shape [N] = {n.shape}, got {sigma.shape}")
    radius = certified_radius(sigma, p_a_lower)
    return CertifyResult(
        prediction=np.where(certified, top, ABSTAIN).astype(np.int64),
        n_a=n_a.astype(np.int64),
        n=n.astype(np.int64),
        p_a_lower=p_a_lower,
        radius=np.where(certified, radius, 0.0),
    )


# --------------------------------------------------------------------------------------------
# PREDICT
# --------------------------------------------------------------------------------------------

_RERR = 1 + 1e-7  # scipy.stats.binomtest's relative tolerance for "as extreme as observed"


def _binom_search(values_at: Callable[[np.ndarray, np.ndarray], np.ndarray], target: np.ndarray,
                  lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Element-wise copy of scipy's ``_binary_search_for_binom_tst`` (scipy/stats/_binomtest.py).

    Runs scipy's exact search for every element at once, quirks included, so the p-values are
    the very numbers ``binomtest`` returns. The loop is over search steps (~log2 n), not images.
    ``values_at(x, idx)`` evaluates the searched function at points ``x`` of elements ``idx``.
    """
    lo, hi = lo.copy(), hi.copy()
    out = np.zeros_like(lo)
    found = np.zeros(lo.shape, dtype=bool)
    while True:
        act = np.flatnonzero(~found & (lo < hi))
        if act.size == 0:
            break
        mid = lo[act] + (hi[act] - lo[act]) // 2
        val = values_at(mid, act)
        less, greater = val < target[act], val > target[act]
        equal = ~(less | greater)
        lo[act[less]] = mid[less] + 1
        hi[act[greater]] = mid[greater] - 1
        out[act[equal]] = mid[equal]
        found[act[equal]] = True
    rest = np.flatnonzero(~found)
    if rest.size:
        ok = values_at(lo[rest], rest) <= target[rest]
        out[rest] = np.where(ok, lo[rest], lo[rest] - 1)
    return out


def binomial_test_pvalue(c1: ArrayLike, c2: ArrayLike) -> np.ndarray:
    """Two-sided exact binomial test of c1 successes in c1 + c2 trials at p = 0.5, vectorized.

    Identical to ``scipy.stats.binomtest(c1, c1 + c2, 0.5).pvalue`` element by element (it
    replays scipy's algorithm, including its 1e-7 relative tolerance when collecting the
    outcomes "at least as extreme" from the other tail). ``scipy.stats.binom_test``, used by the
    reference code, was removed in SciPy 1.12.

    Guarantee: under H0 (c1 ~ Binomial(c1 + c2, 0.5)), P(p-value <= alpha) <= alpha.

    Args:
        c1: counts of the first outcome, integers >= 0.
        c2: counts of the second outcome, integers >= 0, broadcastable with ``c1``.

    Returns:
        float64 p-values in [0, 1] of the broadcast shape. Defined as 1.0 where c1 + c2 = 0 (no
        trials, no evidence) and, as in scipy, 1.0 where c1 = c2.
    """
    c1, c2 = np.broadcast_arrays(_as_counts(c1, "c1"), _as_counts(c2, "c2"))
    shape = c1.shape
    k, n = c1.ravel().astype(np.int64), (c1 + c2).ravel().astype(np.int64)
    pval = np.ones(k.shape, dtype=np.float64)

    # scipy compares k with p * n in floating point; 0.5 * n is exact for every count we meet.
    upper = np.flatnonzero(k > 0.5 * n)  # k above the mode: the other tail is [0, floor(n/2)]
    lower = np.flatnonzero(k < 0.5 * n)  # k below the mode: the other tail is [ceil(n/2), n]

    if upper.size:
        ku, nu = k[upper], n[upper]
        d = binom.pmf(ku, nu, 0.5) * _RERR
        ix = _binom_search(lambda x, i: binom.pmf(x, nu[i], 0.5), d,
                           np.zeros_like(nu), nu // 2)
        y = ix + 1  # number of terms in [0, mode] with pmf <= d
        pval[upper] = binom.cdf(y - 1, nu, 0.5) + binom.sf(ku - 1, nu, 0.5)

    if lower.size:
        kl, nl = k[lower], n[lower]
        d = binom.pmf(kl, nl, 0.5) * _RERR
        ix = _binom_search(lambda x, i: -binom.pmf(x, nl[i], 0.5), -d,
                           (nl + 1) // 2, nl.copy())
        # number of terms in [mode, n] with pmf <= d (ix itself only on exact equality, as scipy)
        y = nl - ix + (d == binom.pmf(ix, nl, 0.5)).astype(np.int64)
        pval[lower] = binom.cdf(kl, nl, 0.5) + binom.sf(nl - y, nl, 0.5)

    return np.minimum(pval, 1.0).reshape(shape)


def predict_from_counts(counts: ArrayLike, alpha: float) -> np.ndarray:
    """PREDICT of Cohen et al. from per-class vote counts, for N images at once.

    The top class is argmax counts (ties: lowest index) with count c1; c2 is the largest count
    among the other classes (0 when C = 1). The image abstains unless the two-sided binomial
    test of c1 successes in c1 + c2 trials at p = 0.5 has p-value <= alpha. A tie c1 = c2 has
    p-value 1 and therefore always abstains, so the tie-breaking never decides a prediction.

    Guarantee (Cohen et al., Prop. 1): for each image, the probability that PREDICT returns a
    class other than g(x), the smoothed classifier's prediction, is at most alpha.

    Args:
        counts: int [N, C] (or [C] for one image), votes of the n noisy copies.
        alpha: test level in (0, 1).

    Returns:
        int64 [N] (length 1 for 1-D input): the predicted class, or ABSTAIN (-1).
    """
    c = _as_rows(counts, "counts")
    _check_alpha(alpha)
    top = np.argmax(c, axis=1)
    rows = np.arange(c.shape[0])
    c1 = c[rows, top]
    others = c.copy()
    others[rows, top] = -1  # hide the top class; -1 < any count, so C = 1 gives c2 = 0 below
    c2 = np.maximum(others.max(axis=1), 0)
    keep = binomial_test_pvalue(c1, c2) <= alpha
    return np.where(keep, top, ABSTAIN).astype(np.int64)


# --------------------------------------------------------------------------------------------
# certified accuracy
# --------------------------------------------------------------------------------------------

def certified_accuracy(radius: ArrayLike, correct: ArrayLike, radii: ArrayLike) -> np.ndarray:
    """Cohen's "approximate certified accuracy": fraction of images correct with radius >= r.

    Abstentions count as wrong. This function cannot see predictions, so the caller must pass
    ``correct = False`` for every abstaining image (an abstention has radius 0, so a True there
    would count at r = 0). ``correct = (prediction == label)`` does this automatically, since
    ABSTAIN = -1 is never a label.

    Args:
        radius: float [N], certified radii (0 for abstentions); N >= 1.
        correct: bool [N], prediction == label (False for abstentions).
        radii: float [R] (or a scalar), the radii r at which to evaluate.

    Returns:
        float64 array of the shape of ``radii``: mean(correct & (radius >= r)) for each r.
    """
    rad = np.asarray(radius, dtype=np.float64)
    cor = np.asarray(correct)
    if rad.ndim != 1 or rad.shape[0] == 0:
        raise ValueError(f"radius must have shape [N] with N >= 1, got {rad.shape}")
    if cor.shape != rad.shape:
        raise ValueError(f"correct must have the shape of radius {rad.shape}, got {cor.shape}")
    if cor.dtype != bool:
        if not np.all((cor == 0) | (cor == 1)):
            raise ValueError("correct must be boolean (or 0/1)")
        cor = cor.astype(bool)
    if np.any(np.isnan(rad)):
        raise ValueError("radius must not contain NaN")
    r = np.asarray(radii, dtype=np.float64)
    # [R, N] comparison: fine for the few radii of a table; sort + searchsorted would be O(N log N)
    # but this keeps the definition visible.
    hits = (rad[None, :] >= r.reshape(-1, 1)) & cor[None, :]
    return hits.mean(axis=1).reshape(r.shape)


def high_probability_certified_accuracy(accuracy: ArrayLike, num_images: int, alpha: float,
                                        rho: float = 0.001, bound: str = "bernstein") -> np.ndarray:
    """Certified accuracy that holds with probability 1 - rho: the approximate one minus a correction.

    Each certificate is wrong with probability at most alpha, independently across images (every
    image draws its own noise), so the number W of wrong certificates among the m images is a sum
    of independent Bernoulli(p_i <= alpha) variables, and the true certified accuracy of the
    smoothed classifier g on these images at radius r is at least ``accuracy - W / m``.

    ``bound="bernstein"`` (default): Bernstein's inequality, P(W - E W >= t) <=
    exp(-t^2 / (2 (V + t / 3))) with V = m v >= Var W (v = alpha (1 - alpha), or 1/4 for alpha > 1/2),
    solved for t at probability rho. With L = ln(1/rho) the returned value is::

        max(0, accuracy - (alpha + L / (3m) + sqrt((L / (3m))^2 + 2 v L / m)))

    and with probability at least 1 - rho over the randomness of CERTIFY the true certified
    accuracy is at least it. (The usual closed form alpha + sqrt(2 v L / m) + 2 L / (3m) is a
    slightly larger, also valid, correction.)

    ``bound="cohen"``: the correction printed by Cohen et al. (2019) and used in their analysis
    code (``analyze.HighProbAccuracy``), alpha + sqrt(alpha (1 - alpha) L / m) + L / (3m), to
    compare with published tables. It is smaller than what the Bernstein inequality above gives
    (half the variance term inside the root, a third of the range term), so no 1 - rho guarantee
    is claimed for it here.

    Args:
        accuracy: approximate certified accuracies in [0, 1] (e.g. from
            :func:`certified_accuracy`), any shape.
        num_images: m, number of images behind ``accuracy``, >= 1.
        alpha: the alpha CERTIFY was run with, in (0, 1).
        rho: failure probability of this statement, in (0, 1).
        bound: ``"bernstein"`` (the guarantee) or ``"cohen"`` (the published correction).

    Returns:
        float64 array of the shape of ``accuracy``, clipped at 0.
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    if not np.all((acc >= 0.0) & (acc <= 1.0)):
        raise ValueError(f"accuracy must lie in [0, 1], got {accuracy!r}")
    m = int(num_images)
    if m != num_images or m < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    alpha = float(_check_alpha(alpha))
    rho = float(_check_alpha(rho, "rho"))
    log_term = np.log(1.0 / rho)
    if bound == "bernstein":
        variance = alpha * (1.0 - alpha) if alpha <= 0.5 else 0.25
        range_term = log_term / (3.0 * m)
        correction = alpha + range_term + np.sqrt(range_term ** 2 + 2.0 * variance * log_term / m)
    elif bound == "cohen":
        correction = alpha + np.sqrt(alpha * (1.0 - alpha) * log_term / m) + log_term / (3.0 * m)
    else:
        raise ValueError(f"bound must be 'bernstein' or 'cohen', got {bound!r}")
    return np.maximum(acc - correction, 0.0)


def wilson_interval(successes: ArrayLike, n: ArrayLike, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval for a proportion: the attack evaluation's accuracy intervals.

    With z = Phi^-1((1 + confidence) / 2) and p = successes / n::

        center = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    the interval is [center - half, center + half], within [0, 1]. It is what
    ``scipy.stats.binomtest(k, n).proportion_ci(confidence, method="wilson")`` returns for integer
    k (tests pin the two together); here ``successes`` may be fractional, as for the mean rule
    of :mod:`densepure_core.attack.scoring` (a sum of per-image fractions). Rows with n = 0 give
    NaN.

    Args:
        successes: in [0, n], any shape (broadcast with ``n``).
        n: trials (images), >= 0.
        confidence: two-sided level in (0, 1).

    Returns:
        (low, high), float64 arrays of the broadcast shape.
    """
    k = np.asarray(successes, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if np.any(m < 0) or np.any(k < 0) or np.any(k > m):
        raise ValueError("need 0 <= successes <= n")
    z = float(norm.ppf((1.0 + float(confidence)) / 2.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / m
        denom = 1.0 + z * z / m
        center = (p + z * z / (2.0 * m)) / denom
        half = z / denom * np.sqrt(p * (1.0 - p) / m + z * z / (4.0 * m * m))
        low, high = np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)
    return np.where(m > 0, low, np.nan), np.where(m > 0, high, np.nan)


def paired_difference_interval(both: ArrayLike, first_only: ArrayLike, second_only: ArrayLike,
                               neither: ArrayLike, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval (1998, method 10) for the difference of two paired
    proportions: the same images under two runs, p_second - p_first.

    With n = both + first_only + second_only + neither, p1 = (both + first_only) / n and
    p2 = (both + second_only) / n, (l1, u1) and (l2, u2) their Wilson intervals
    (:func:`wilson_interval`) and phi the correlation of the 2x2 table with Newcombe's continuity
    adjustment (A = both * neither - first_only * second_only)::

        phi = (A - n/2) / sqrt(r1 r2 c1 c2) if A > n/2;  0 if 0 <= A <= n/2;  A / sqrt(r1 r2 c1 c2) if A < 0
              (0 if a margin is 0)
        theta = p2 - p1
        low  = theta - sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)
        high = theta + sqrt((u2 - p2)^2 - 2 phi (u2 - p2)(p1 - l1) + (p1 - l1)^2)

    (Newcombe, "Improved confidence intervals for the difference between binomial proportions
    based on paired data", Stat. Med. 17, 1998; the "square-and-add" interval of Fagerland,
    Lydersen & Laake, *Statistical Analysis of Contingency Tables*, ch. 8, whose worked example
    the tests pin). Its coverage is close to nominal down to small n and it stays within
    [-1, 1]; the Wald interval does neither. Rows with n = 0 give NaN.

    Args:
        both, first_only, second_only, neither: the 2x2 counts (>= 0), broadcastable.
        confidence: two-sided level in (0, 1).

    Returns:
        (low, high) of p_second - p_first, float64 arrays of the broadcast shape.
    """
    a, b, c, d = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (both, first_only, second_only,
                                                                                   neither)))
    n = a + b + c + d
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = (a + b) / n, (a + c) / n
        l1, u1 = wilson_interval(a + b, n, confidence)
        l2, u2 = wilson_interval(a + c, n, confidence)
        margins = (a + b) * (c + d) * (a + c) * (b + d)
        cross = a * d - b * c
        adjusted = np.where(cross > n / 2, cross - n / 2, np.where(cross < 0, cross, 0.0))
        phi = np.where(margins > 0, adjusted / np.sqrt(np.where(margins > 0, margins, 1.0)), 0.0)
        theta = p2 - p1
        low = theta - np.sqrt(np.maximum((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
        high = theta + np.sqrt(np.maximum((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2, 0.0))
    return np.clip(low, -1.0, 1.0), np.clip(high, -1.0, 1.0)
