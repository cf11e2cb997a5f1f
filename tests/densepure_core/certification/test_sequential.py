"""Tests for densepure_core.certification.sequential: anytime-valid bounds, the stopping rule, validity by
simulation, and equivalence with fixed CERTIFY when stopping is off.

Run: .venv/bin/python -m pytest tests/densepure_core/certification/test_sequential.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats as st

from densepure_core.certification.sequential import (
    STOP_REASONS,
    anytime_lower_bound,
    anytime_upper_bound,
    batch_looks,
    geometric_looks,
    look_alphas,
    sequential_certify,
    simulate_sequential,
    stop_reasons,
)
from densepure_core.certification.stats import ABSTAIN, certify_from_counts, clopper_pearson_lower

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0]


def stream(probs, total, seed):
    """sample(m) over a pre-drawn label stream: copy indices continue across calls."""
    labels = np.random.default_rng(seed).choice(len(probs), size=total, p=probs)
    pos = [0]

    def sample(m):
        out = labels[pos[0]:pos[0] + m]
        pos[0] += m
        return out

    return sample, labels


# ---------------------------------------------------------------- schedules

def test_schedules():
    assert geometric_looks(100, 10_000, 2) == (100, 200, 400, 800, 1600, 3200, 6400, 10_000)
    assert geometric_looks(100, 10_000) == (100, 200, 300, 500, 800, 1100, 1700, 2600, 3800,
                                            5800, 8600, 10_000)
    assert geometric_looks(100, 50) == (50,)
    assert batch_looks(64, 200) == (64, 128, 192, 200)
    np.testing.assert_allclose(look_alphas([1, 2, 3, 4], 0.01), [0.0025] * 4)
    np.testing.assert_allclose(look_alphas([1, 2, 3, 4], 0.01, "late"), [0.01 / 6] * 3 + [0.005])
    np.testing.assert_allclose(look_alphas([7], 0.01, "late"), [0.01])


# ---------------------------------------------------------------- pinned bounds

@pytest.mark.parametrize("split", ["equal", "late"])
def test_staged_bounds_are_clopper_pearson_at_the_look_alpha(split):
    looks, alpha = [100, 200, 400], 0.001
    a_k = look_alphas(looks, alpha, split)
    for k, n in enumerate(looks):
        s = np.array([1, n // 3, n // 2, n - 7, n - 1])
        lo = anytime_lower_bound(s, n, alpha, "staged", looks=looks, split=split)
        up = anytime_upper_bound(s, n, alpha, "staged", looks=looks, split=split)
        np.testing.assert_allclose(lo, st.beta.ppf(a_k[k], s, n - s + 1), rtol=1e-10)
        np.testing.assert_allclose(up, st.beta.ppf(1 - a_k[k], s + 1, n - s), rtol=1e-10)
    assert anytime_lower_bound(0, 200, alpha, "staged", looks=looks) == 0.0
    assert anytime_upper_bound(200, 200, alpha, "staged", looks=looks) == 1.0
    # a single look is exactly fixed CERTIFY's bound
    assert anytime_lower_bound(970, 1000, alpha, "staged", looks=[1000]) == \
        clopper_pearson_lower(970, 1000, alpha)


def test_staged_refuses_n_off_the_schedule_and_bad_params():
    with pytest.raises(ValueError, match="looks fixed in advance"):
        anytime_lower_bound(50, 150, 0.01, "staged", looks=[100, 200])
    with pytest.raises(ValueError, match="looks"):
        anytime_lower_bound(50, 100, 0.01, "staged")
    with pytest.raises(ValueError, match="split"):
        anytime_lower_bound(50, 100, 0.01, "staged", looks=[100], split="early")
    with pytest.raises(ValueError, match="bound"):
        anytime_lower_bound(50, 100, 0.01, "hoeffding")


def _log_m(s, n, p, a, b):
    """Direct transcription of the beta-binomial mixture martingale log M_n(p) with math.lgamma."""
    log_beta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    return (log_beta(a + s, b + n - s) - log_beta(a, b)
            - s * math.log(p) - (n - s) * math.log1p(-p))


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 1.0), (2.0, 0.5)])
def test_betabin_bounds_are_the_roots_of_the_closed_form(a, b):
    alpha = 0.001
    level = math.log(1 / alpha)
    for s, n in [(1, 10), (7, 10), (90, 100), (500, 1000), (9990, 10_000), (3, 3000)]:
        lo = float(anytime_lower_bound(s, n, alpha, "betabin", a=a, b=b))
        up = float(anytime_upper_bound(s, n, alpha, "betabin", a=a, b=b))
        assert 0 < lo < s / n < up < 1
        for edge, step in [(lo, -1), (up, +1)]:
            # on the boundary (M = 1/alpha) and just inside the interval M < 1/alpha
            assert _log_m(s, n, edge, a, b) == pytest.approx(level, abs=1e-6)
            assert _log_m(s, n, edge, a, b) >= level - 1e-9       # conservative side
            assert _log_m(s, n, edge - step * 1e-6 * min(edge, 1 - edge), a, b) < level


def test_betabin_pinned_values():
    n = 10_000
    # uniform prior, all correct: M_n(p) = 1 / ((n + 1) p^n), so lower = (alpha / (n + 1))^(1/n)
    assert float(anytime_lower_bound(n, n, 0.001, "betabin", a=1, b=1)) == \
        pytest.approx((0.001 / (n + 1)) ** (1 / n), rel=1e-13)
    # Jeffreys prior: lower = (alpha B(n + 1/2, 1/2) / pi)^(1/n)
    log_b = math.lgamma(n + 0.5) + math.lgamma(0.5) - math.lgamma(n + 1)
    assert float(anytime_lower_bound(n, n, 0.001, "betabin")) == \
        pytest.approx(math.exp((math.log(0.001) + log_b - math.log(math.pi)) / n), rel=1e-13)
    assert float(anytime_lower_bound(0, 50, 0.001, "betabin")) == 0.0
    assert float(anytime_upper_bound(50, 50, 0.001, "betabin")) == 1.0
    # regression pins (values of this implementation, cross-checked by the root test above)
    np.testing.assert_allclose(anytime_lower_bound([90, 100], 100, 0.001, "betabin"),
                               [0.72389107, 0.90679438], rtol=1e-7)


def test_bounds_are_vectorized():
    s = np.array([[10, 50], [90, 100]])
    out = anytime_lower_bound(s, 100, 0.01, "betabin")
    assert out.shape == (2, 2)
    assert out[1, 0] == anytime_lower_bound(90, 100, 0.01, "betabin")
    out = anytime_lower_bound(s, np.array([100, 200]), 0.01, "staged", looks=[100, 200])
    assert out.shape == (2, 2)


# ---------------------------------------------------------------- stopping rule

def test_stop_reasons_each_case():
    sigma, n_max, sched = 0.5, 1000, [100, 500, 1000]
    thr = st.norm.cdf(np.array([0.25, 0.5]) / sigma)  # grid [0, 0.25, 0.5]
    radii = [0.0, 0.25, 0.5]

    def code(n_a, n, lower, upper):
        c = stop_reasons(n_a, n, lower, upper, 0.01, sigma, radii, n_max, sched, "staged",
                         looks=sched)
        return STOP_REASONS[int(c)]

    assert code(30, 100, 0.2, 0.45) == "abstain"
    assert code(60, 100, 0.4, 0.7) == "continue"
    assert code(60, 100, 0.51, thr[0] - 1e-3) == "upper"            # certified, r=0.25 ruled out
    assert code(99, 100, thr[1] + 1e-3, 1.0) == "top"
    assert code(60, 100, 0.6, 0.75) == "continue"                   # 0.25 still open
    # 50 of 100 now: 950 of 1000 (all the rest correct) still reaches Phi(0.5/0.5) = 0.84
    assert code(50, 100, 0.5, 0.7) == "continue"
    # 100 of 500 now: 600 of 1000 at most, CP below Phi(0.25/0.5) = 0.69: 0.25 unreachable
    assert code(100, 500, 0.5, 0.7) == "unreachable"
    assert code(700, 1000, 0.55, 0.8) == "n_max"
    assert code(600, 1000, 0.55, 0.65) == "upper"  # "upper" takes precedence over "n_max"


# ---------------------------------------------------------------- validity by simulation

REPS, TOL, ALPHA = 20_000, 0.005, 0.05
# With 20,000 independent runs the standard error of a rate near 0.05 is 0.0016: a true rate of
# 0.06 (a 1-point excess) passes the check "rate <= alpha + 0.005" with probability ~0.001
# (3 standard errors), while a valid rate <= 0.05 fails it with probability <= 0.0007.


def _increments(p_a, schedule, seed):
    sizes = np.diff(np.concatenate([[0], schedule]))
    return np.random.default_rng(seed).binomial(sizes, p_a, size=(REPS, len(schedule)))


@pytest.mark.parametrize("bound", ["staged", "betabin"])
@pytest.mark.parametrize("p_a", [0.5001, 0.55, 0.7, 0.9, 0.99, 1.0])
def test_validity_under_adversarial_and_rule_stopping(bound, p_a):
    n_max, batch, sigma = 1000, 50, 0.5
    sched = geometric_looks(batch, n_max) if bound == "staged" else batch_looks(batch, n_max)
    inc = _increments(p_a, sched, seed=int(p_a * 1e4) + len(bound))
    out = simulate_sequential(inc, sched, ALPHA, sigma, RADII, bound)
    # Adversarial stopping: stop at the look where the lower bound is largest (it even sees the
    # future), the rule that maximizes the chance of overclaiming; it dominates every rule.
    adversarial = np.mean(out["lower_path"].max(axis=1) > p_a)
    assert adversarial <= ALPHA + TOL, adversarial
    # the project's rule: lower bound at the stop above pA <=> radius above sigma Phi^-1(pA)
    assert np.mean(out["lower"] > p_a) <= ALPHA + TOL
    if p_a == 0.5001:  # mostly abstains, and never early with a certificate beyond the truth
        assert np.mean(out["lower"] >= 0.5) <= ALPHA + TOL


def test_the_simulation_detects_an_invalid_bound():
    # Negative control: plain CP at the full alpha at every one of 20 looks is not anytime-valid;
    # the adversarial rule must push its overclaim rate well past alpha + TOL.
    sched = batch_looks(50, 1000)
    inc = _increments(0.9, sched, seed=7)
    cum = np.cumsum(inc, axis=1)
    naive = clopper_pearson_lower(cum, np.broadcast_to(sched, cum.shape), ALPHA)
    assert np.mean(naive.max(axis=1) > 0.9) > ALPHA + 3 * TOL


# ---------------------------------------------------------------- one image

@pytest.mark.parametrize("bound", ["staged", "betabin"])
def test_stop_off_draws_the_same_copies_and_counts_as_fixed_certify(bound):
    n0, n_max, batch, alpha, sigma = 100, 1000, 64, 0.001, 0.5
    for seed, probs in enumerate([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.45, 0.45, 0.1],
                                  [1.0, 0.0, 0.0], [0.2, 0.4, 0.4]]):
        sample, labels = stream(probs, n0 + n_max + 10, seed)
        r = sequential_certify(sample, n0, n_max, alpha, sigma, RADII, batch, bound=bound,
                               stop=False, num_classes=3)
        c0 = np.bincount(labels[:n0], minlength=3)
        c = np.bincount(labels[n0:n0 + n_max], minlength=3)
        np.testing.assert_array_equal(r.counts0, c0)
        np.testing.assert_array_equal(r.counts, c)
        assert r.n_used == n_max and r.stop_reason == "n_max" and r.looks == (n_max,)
        fixed = certify_from_counts(c0, c, sigma, alpha)
        assert r.n_a == fixed.n_a[0]
        if bound == "staged":  # one look with all of alpha: exactly fixed CERTIFY
            assert r.prediction == fixed.prediction[0]
            assert r.p_a_lower == fixed.p_a_lower[0]
            assert r.radius == fixed.radius[0]
        else:                  # the mixture bound is valid but looser at a fixed n
            assert r.p_a_lower <= fixed.p_a_lower[0]


@pytest.mark.parametrize("bound", ["staged", "betabin"])
def test_adaptive_uses_a_prefix_of_the_stream_and_matches_the_vectorized_rule(bound):
    n0, n_max, batch, alpha, sigma = 100, 2000, 100, 0.001, 0.5
    sched = geometric_looks(batch, n_max) if bound == "staged" else batch_looks(batch, n_max)
    for seed, p in enumerate([0.3, 0.6, 0.8, 0.95, 0.999, 1.0]):
        sample, labels = stream([p, 1 - p], n0 + n_max, seed)
        labels[:n0] = 0  # selection picks class 0 (pA = p) for every p
        r = sequential_certify(sample, n0, n_max, alpha, sigma, RADII, batch, bound=bound)
        est = labels[n0:n0 + r.n_used]
        np.testing.assert_array_equal(r.counts, np.bincount(est, minlength=r.counts.size))
        assert r.counts.sum() == r.n_used and r.looks[-1] == r.n_used
        # the same stream through the vectorized rule (used by the simulations) agrees
        hits = (labels[n0:] == 0).astype(np.int64)
        inc = np.add.reduceat(hits, np.concatenate([[0], np.asarray(sched[:-1])]))[None, :]
        sim = simulate_sequential(inc, sched, alpha, sigma, RADII, bound)
        assert sim["n_used"][0] == r.n_used
        assert STOP_REASONS[sim["reason"][0]] == r.stop_reason
        assert sim["lower"][0] == r.p_a_lower
        # re-evaluation from stored fields alone (bound_params survives a JSON round trip)
        params = json.loads(json.dumps(r.bound_params))
        assert anytime_lower_bound(r.n_a, r.n_used, r.alpha, r.bound, **params) == r.p_a_lower


def test_abstention_stops_early():
    sample, _ = stream([0.4, 0.3, 0.3], 100 + 10_000, seed=3)
    r = sequential_certify(sample, 100, 10_000, 0.001, 0.5, RADII, 100)
    assert r.prediction == ABSTAIN and r.radius == 0.0
    assert r.stop_reason in ("abstain", "unreachable")  # upper < 1/2, or 1/2 out of reach
    assert r.n_used <= 1000


def test_unanimous_image_at_one_headline_radius_stops_long_before_n_max():
    sample, _ = stream([0.0, 1.0], 100 + 10_000, seed=4)
    r = sequential_certify(sample, 100, 10_000, 0.001, 0.5, [0.0, 0.5], 100)
    assert r.prediction == 1 and r.radius >= 0.5 and r.stop_reason == "top"
    assert r.n_used <= 10_000 // 50


def test_deterministic_given_the_sample_function():
    results = []
    for _ in range(2):
        sample, _labels = stream([0.85, 0.1, 0.05], 100 + 5000, seed=11)
        results.append(sequential_certify(sample, 100, 5000, 0.001, 0.25, RADII, 100))
    a, b = results
    assert (a.prediction, a.radius, a.n_used, a.p_a_lower, a.looks, a.stop_reason) == \
        (b.prediction, b.radius, b.n_used, b.p_a_lower, b.looks, b.stop_reason)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_bad_sample_function_is_refused():
    with pytest.raises(ValueError, match="class labels"):
        sequential_certify(lambda m: np.zeros(m + 1, dtype=int), 10, 100, 0.01, 0.5, RADII, 10)
    with pytest.raises(ValueError, match="last look"):
        sequential_certify(lambda m: np.zeros(m, dtype=int), 10, 100, 0.01, 0.5, RADII, 10,
                           looks=[10, 50])
