"""Tests for densepure_core.certification.stats: pinned numbers and direct comparisons with scipy.

Run: .venv/bin/python -m pytest tests/densepure_core/certification/test_stats.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st

from densepure_core.certification.stats import (
    ABSTAIN,
    CertifyResult,
    binomial_test_pvalue,
    certified_accuracy,
    certified_radius,
    certify_from_counts,
    clopper_pearson_lower,
    high_probability_certified_accuracy,
    max_certifiable_radius,
    paired_difference_interval,
    predict_from_counts,
)

ALPHA = 0.001


# ---------------------------------------------------------------- Clopper-Pearson lower bound

def test_cp_zero_successes_is_exactly_zero():
    out = clopper_pearson_lower([0, 0, 0], [1, 100, 10**6], ALPHA)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])


def test_cp_all_successes_is_alpha_root_n():
    # Beta(n, 1) has CDF x**n, so its alpha quantile is alpha**(1/n).
    assert clopper_pearson_lower(10_000, 10_000, ALPHA) == pytest.approx(ALPHA ** (1 / 10_000),
                                                                         rel=1e-14)
    assert float(clopper_pearson_lower(10_000, 10_000, ALPHA)) == pytest.approx(
        0.9993094630025899, rel=1e-13)  # exp(ln(0.001) / 10^4)
    assert clopper_pearson_lower(100, 100, ALPHA) == pytest.approx(0.933254300796991, rel=1e-13)


def test_cp_tiny_n_closed_forms():
    # n = 1: Beta(1, 1) is uniform -> alpha. n = 2: Beta(1, 2) CDF 1 - (1 - x)^2 -> 1 - sqrt(1 - a);
    # Beta(2, 1) CDF x^2 -> sqrt(a).
    out = clopper_pearson_lower([0, 1, 0, 1, 2], [1, 1, 2, 2, 2], ALPHA)
    expected = [0.0, ALPHA, 0.0, 1 - math.sqrt(1 - ALPHA), math.sqrt(ALPHA)]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(out[3:], [0.0005001250625390474, 0.03162277660168379], rtol=1e-12)


def test_cp_large_n_against_scipy_beta():
    n_a = np.array([99_000, 50_000, 100_000, 999_000, 500_000, 1_000_000, 1])
    n = np.array([100_000, 100_000, 100_000, 1_000_000, 1_000_000, 1_000_000, 1_000_000])
    out = clopper_pearson_lower(n_a, n, ALPHA)
    np.testing.assert_allclose(out, st.beta.ppf(ALPHA, n_a, n - n_a + 1), rtol=1e-10)
    assert out[5] == pytest.approx(ALPHA ** 1e-6, rel=1e-14)


def test_cp_random_grid_against_scipy_beta():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200_000, size=2_000)
    n_a = rng.integers(1, n + 1)  # 1 <= n_a <= n
    alpha = rng.choice([1e-5, 1e-3, 0.01, 0.05, 0.3], size=n.shape)
    out = clopper_pearson_lower(n_a, n, alpha)
    np.testing.assert_allclose(out, st.beta.ppf(alpha, n_a, n - n_a + 1), rtol=1e-10)


def test_cp_broadcasts():
    out = clopper_pearson_lower(np.array([[10], [90]]), np.array([100, 1000]), ALPHA)
    assert out.shape == (2, 2)
    assert out[1, 0] == pytest.approx(st.beta.ppf(ALPHA, 90, 11), rel=1e-10)
    assert clopper_pearson_lower(5, 10, 0.05).shape == ()


@pytest.mark.parametrize("n_a, n, alpha, name", [
    (-1, 10, ALPHA, "n_a"), (11, 10, ALPHA, "n_a"), (1.5, 10, ALPHA, "n_a"),
    (0, 0, ALPHA, "n"), (1, 10, 0.0, "alpha"), (1, 10, 1.0, "alpha"),
    (1, 10, float("nan"), "alpha"),
])
def test_cp_validation_names_argument(n_a, n, alpha, name):
    with pytest.raises(ValueError, match=name):
        clopper_pearson_lower(n_a, n, alpha)


# ---------------------------------------------------------------- radii

def test_radius_caps_published_values():
    caps = max_certifiable_radius(1.0, [10**4, 10**5], ALPHA)
    np.testing.assert_allclose(np.round(caps, 2), [3.20, 3.81])
    np.testing.assert_allclose(caps, [3.1985775147383384, 3.8114565633899145], rtol=1e-10)
    # The cap is the radius CERTIFY gives at n_a = n, and scales linearly with sigma.
    via_cp = certified_radius(0.5, clopper_pearson_lower(10**5, 10**5, ALPHA))
    assert max_certifiable_radius(0.5, 10**5, ALPHA) == pytest.approx(via_cp, rel=1e-9)


def test_radius_against_scipy_norm_and_threshold():
    p = np.array([0.0, 0.3, np.nextafter(0.5, 0.0), 0.5, 0.75, 0.99])
    out = certified_radius(0.25, p)
    expected = np.where(p >= 0.5, 0.25 * st.norm.ppf(p), 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=0)
    assert out[2] == 0.0 and out[3] == 0.0  # just below 0.5: no certificate; at 0.5: radius 0
    assert out[4] == pytest.approx(0.25 * 0.6744897501960817, rel=1e-12)


def test_radius_validation():
    with pytest.raises(ValueError, match="sigma"):
        certified_radius(0.0, 0.9)
    with pytest.raises(ValueError, match="p_a_lower"):
        certified_radius(0.5, 1.2)


# ---------------------------------------------------------------- CERTIFY

def test_certify_hand_worked_example():
    sigma = 0.25
    counts0 = np.array([[0, 100, 0],    # clear winner 1
                        [50, 50, 0],    # tie between 0 and 1 -> class 0 (lowest index)
                        [3, 0, 97]])    # winner 2
    counts = np.array([[0, 100, 0],     # n_a = n = 100: p = 0.001**(1/100)
                       [60, 40, 0],     # n_a = 60 of 100: bound 0.44 < 0.5 -> abstain
                       [5, 5, 90]])     # n_a = 90 of 100
    r = certify_from_counts(counts0, counts, sigma, ALPHA)
    assert isinstance(r, CertifyResult) and len(r) == 3
    np.testing.assert_array_equal(r.prediction, [1, ABSTAIN, 2])
    np.testing.assert_array_equal(r.n_a, [100, 60, 90])
    np.testing.assert_array_equal(r.n, [100, 100, 100])
    for field in ("prediction", "n_a", "n"):
        assert getattr(r, field).dtype == np.int64
    # exp(ln(0.001) / 100) = 0.933254300796991; Phi^-1 of it = 1.5004750241206364.
    np.testing.assert_allclose(r.p_a_lower, [0.933254300796991, 0.4409842652212994,
                                             0.7753298801677749], rtol=1e-9)
    np.testing.assert_allclose(r.radius, [0.3751187560301591, 0.0, 0.18912885127799695],
                               rtol=1e-9, atol=0)
    np.testing.assert_allclose(r.p_a_lower[1:], st.beta.ppf(ALPHA, [60, 90], [41, 11]), rtol=1e-10)


def test_certify_abstains_just_below_half():
    # n = 1000, alpha = 0.001: n_a = 550 is the first count whose bound reaches 0.5.
    r = certify_from_counts(np.array([[9, 1], [9, 1]]), np.array([[549, 451], [550, 450]]),
                            1.0, ALPHA)
    assert r.p_a_lower[0] == pytest.approx(0.4996730641422577, rel=1e-9)
    assert r.p_a_lower[1] == pytest.approx(0.5006759600925578, rel=1e-9)
    np.testing.assert_array_equal(r.prediction, [ABSTAIN, 0])
    assert r.radius[0] == 0.0
    assert r.radius[1] == pytest.approx(st.norm.ppf(0.5006759600925578), rel=1e-9)


def test_certify_tie_goes_to_lowest_index():
    r = certify_from_counts([0, 7, 3, 7], [0, 10, 990, 0], 0.5, ALPHA)
    # counts0 ties classes 1 and 3 -> class 1, even though counts favour class 2.
    assert r.n_a[0] == 10 and r.prediction[0] == ABSTAIN
    r = certify_from_counts([0, 7, 3, 7], [0, 1000, 0, 0], 0.5, ALPHA)
    assert r.prediction[0] == 1
    assert r.radius[0] == pytest.approx(0.5 * st.norm.ppf(ALPHA ** (1 / 1000)), rel=1e-9)


def test_certify_single_image_1d_gives_length_one():
    r = certify_from_counts([1, 99], [10, 990], 0.5, ALPHA)
    assert r.prediction.shape == r.radius.shape == r.n_a.shape == (1,)
    assert r.prediction[0] == 1 and r.n[0] == 1000


def test_certify_vectorized_equals_per_image_loop():
    rng = np.random.default_rng(1)
    n_img, n_cls = 64, 10
    p = rng.dirichlet(np.full(n_cls, 0.3), size=n_img)
    counts0 = np.stack([rng.multinomial(100, pi) for pi in p])
    counts = np.stack([rng.multinomial(1000, pi) for pi in p])
    sigma = rng.choice([0.12, 0.25, 0.5, 1.0], size=n_img)
    batch = certify_from_counts(counts0, counts, sigma, ALPHA)
    assert (batch.prediction == ABSTAIN).any() and (batch.prediction != ABSTAIN).any()
    for i in range(n_img):
        one = certify_from_counts(counts0[i], counts[i], sigma[i], ALPHA)
        for field in ("prediction", "n_a", "n", "p_a_lower", "radius"):
            assert getattr(one, field)[0] == getattr(batch, field)[i], (field, i)
        # and the reference definition, straight from scipy
        c_a = int(np.argmax(counts0[i]))
        lower = st.beta.ppf(ALPHA, counts[i, c_a], counts[i].sum() - counts[i, c_a] + 1)
        assert batch.p_a_lower[i] == pytest.approx(lower, rel=1e-10)
        if lower < 0.5:
            assert batch.prediction[i] == ABSTAIN and batch.radius[i] == 0.0
        else:
            assert batch.prediction[i] == c_a
            assert batch.radius[i] == pytest.approx(sigma[i] * st.norm.ppf(lower), rel=1e-9)


def test_certify_validation():
    with pytest.raises(ValueError, match=r"counts0 .*counts"):
        certify_from_counts(np.ones((2, 3), int), np.ones((2, 4), int), 0.5, ALPHA)
    with pytest.raises(ValueError, match="counts"):
        certify_from_counts([1, 0], [0, 0], 0.5, ALPHA)
    with pytest.raises(ValueError, match="counts0"):
        certify_from_counts([0, 0], [1, 0], 0.5, ALPHA)
    with pytest.raises(ValueError, match="counts"):
        certify_from_counts([1, -1], [1, 0], 0.5, ALPHA)
    with pytest.raises(ValueError, match="sigma"):
        certify_from_counts([1, 0], [1, 0], -0.5, ALPHA)
    with pytest.raises(ValueError, match="alpha"):
        certify_from_counts([1, 0], [1, 0], 0.5, 2.0)
    with pytest.raises(ValueError, match="sigma"):
        certify_from_counts(np.ones((3, 2), int), np.ones((3, 2), int), [0.5, 0.25], ALPHA)


# ---------------------------------------------------------------- binomial test and PREDICT

def _scipy_pvalue(c1: int, c2: int) -> float:
    return 1.0 if c1 + c2 == 0 else st.binomtest(int(c1), int(c1 + c2), 0.5).pvalue


def test_binomial_pvalue_small_grid_identical_to_scipy():
    c1, c2 = (g.ravel() for g in np.meshgrid(np.arange(21), np.arange(21)))
    ours = binomial_test_pvalue(c1, c2)
    ref = np.array([_scipy_pvalue(a, b) for a, b in zip(c1, c2)])
    np.testing.assert_array_equal(ours, ref)  # same algorithm, same floating-point numbers
    assert ours[(c1 == c2)].tolist() == [1.0] * 21  # includes c1 = c2 = 0


def test_binomial_pvalue_large_counts_identical_to_scipy():
    pairs = [(5_000, 4_800), (4_800, 5_000), (50_000, 49_500), (100_000, 0), (0, 100_000),
             (123_456, 120_000), (10**6, 10**6 - 1_500), (3, 10**6), (10**6, 10**6),
             (2 * 10**7, 2 * 10**7 - 3_000)]  # n > 2e7: scipy's 1e-7 tolerance matters here
    c1, c2 = np.array(pairs).T
    ours = binomial_test_pvalue(c1, c2)
    ref = np.array([_scipy_pvalue(a, b) for a, b in pairs])
    np.testing.assert_array_equal(ours, ref)


def test_binomial_pvalue_pinned_values():
    # c2 = 0: 2 * 0.5**c1 ; 7 vs 3: 2 * P(X <= 3), X ~ Bin(10, 1/2) = 2 * 176/1024.
    np.testing.assert_allclose(binomial_test_pvalue([10, 1, 7, 3], [0, 0, 3, 7]),
                               [2 * 0.5**10, 1.0, 0.34375, 0.34375], rtol=1e-14)
    assert binomial_test_pvalue(0, 0) == 1.0
    assert binomial_test_pvalue(np.zeros((2, 3), int), 1).shape == (2, 3)


def test_predict_matches_loop_over_scipy_binomtest():
    rng = np.random.default_rng(2)
    n_img, n_cls = 120, 6
    p = rng.dirichlet(np.full(n_cls, 0.5), size=n_img)
    counts = np.stack([rng.multinomial(rng.integers(1, 60), pi) for pi in p])
    ours = predict_from_counts(counts, 0.01)
    assert ours.dtype == np.int64 and ours.shape == (n_img,)
    assert (ours == ABSTAIN).any() and (ours != ABSTAIN).any()
    for i, row in enumerate(counts):
        c2, c1 = np.sort(row)[-2:]
        expected = int(np.argmax(row)) if st.binomtest(int(c1), int(c1 + c2), 0.5).pvalue <= 0.01 \
            else ABSTAIN
        assert ours[i] == expected, i


def test_predict_hand_examples():
    counts = np.array([[0, 10, 0],   # p = 2 / 1024 <= 0.01 -> predict 1
                       [5, 5, 0],    # tie -> p = 1 -> abstain
                       [7, 0, 3],    # p = 0.34375 -> abstain
                       [0, 0, 0]])   # no votes -> p = 1 -> abstain
    np.testing.assert_array_equal(predict_from_counts(counts, 0.01), [1, ABSTAIN, ABSTAIN, ABSTAIN])
    # 9 vs 3 in 12 trials: p = 2 * 299 / 4096 = 0.146...: predicts at alpha 0.2, not at 0.1.
    assert binomial_test_pvalue(9, 3) == pytest.approx(2 * 299 / 4096, rel=1e-14)
    np.testing.assert_array_equal(predict_from_counts([3, 9], 0.2), [1])
    np.testing.assert_array_equal(predict_from_counts([3, 9], 0.1), [ABSTAIN])
    np.testing.assert_array_equal(predict_from_counts([10], 0.01), [0])  # one class: c2 = 0


# ---------------------------------------------------------------- certified accuracy

def test_certified_accuracy_hand_example():
    radius = np.array([0.0, 0.3, 0.5, 1.2, 0.0])
    correct = np.array([True, True, False, True, False])  # image 4 abstained -> correct False
    radii = np.array([0.0, 0.25, 0.5, 1.0, 1.5])
    out = certified_accuracy(radius, correct, radii)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.6, 0.4, 0.2, 0.2, 0.0])
    assert certified_accuracy(radius, correct.astype(int), 0.3) == pytest.approx(0.4)


def test_certified_accuracy_from_certify_counts_abstention_as_wrong():
    r = certify_from_counts([[0, 9], [9, 0]], [[0, 1000], [450, 550]], 0.5, ALPHA)
    labels = np.array([1, 0])
    correct = r.prediction == labels  # the abstention (-1) never equals a label
    np.testing.assert_array_equal(certified_accuracy(r.radius, correct, [0.0]), [0.5])


def test_certified_accuracy_validation():
    with pytest.raises(ValueError, match="correct"):
        certified_accuracy([0.1, 0.2], [True], [0.0])
    with pytest.raises(ValueError, match="radius"):
        certified_accuracy([], [], [0.0])


def _bernstein_transcribed(alpha, m, rho):
    """Solve t^2 = 2 L (m alpha (1 - alpha) + t / 3) for t (Bernstein at probability rho)."""
    L = math.log(1 / rho)
    t = L / 3 + math.sqrt(L * L / 9 + 2 * m * alpha * (1 - alpha) * L)
    return alpha + t / m


@pytest.mark.parametrize("m, alpha, rho", [(500, 0.001, 0.001), (100, 0.001, 0.01), (1000, 0.01, 0.05),
                                           (50, 0.2, 0.1)])
def test_high_probability_accuracy_is_the_bernstein_bound(m, alpha, rho):
    correction = _bernstein_transcribed(alpha, m, rho)
    out = high_probability_certified_accuracy(np.array([0.6, 0.0, 1.0]), m, alpha, rho)
    np.testing.assert_allclose(out, [max(0.0, 0.6 - correction), 0.0, 1.0 - correction], rtol=1e-13)
    L = math.log(1 / rho)
    textbook = alpha + math.sqrt(2 * alpha * (1 - alpha) * L / m) + 2 * L / (3 * m)
    cohen = alpha + math.sqrt(alpha * (1 - alpha) * L / m) + L / (3 * m)
    assert cohen < correction <= textbook
    # the guarantee, checked exactly for the worst case p_i = alpha: P(W / m > correction) <= rho
    wrong_allowed = math.floor(m * correction + 1e-12)
    assert st.binom.sf(wrong_allowed, m, alpha) <= rho


def test_high_probability_accuracy_pinned_values():
    out = high_probability_certified_accuracy(np.array([0.6, 0.005, 1.0]), 500, ALPHA, 0.001)
    assert out[0] == pytest.approx(0.5874083441068251, rel=1e-12)
    assert out[1] == 0.0  # clipped
    assert out[2] == pytest.approx(0.9874083441068251, rel=1e-12)


def test_high_probability_accuracy_cohen_published_correction():
    m, rho = 500, 0.001
    log_term = math.log(1 / rho)  # 6.907755278982137
    correction = ALPHA + math.sqrt(ALPHA * (1 - ALPHA) * log_term / m) + log_term / (3 * m)
    out = high_probability_certified_accuracy(np.array([0.6, 0.005, 1.0]), m, ALPHA, rho, bound="cohen")
    np.testing.assert_allclose(out, [0.6 - correction, 0.0, 1.0 - correction], rtol=1e-14)
    assert out[0] == pytest.approx(0.5906797665511042, rel=1e-12)
    assert out[1] == 0.0  # clipped


def test_high_probability_accuracy_validation():
    with pytest.raises(ValueError, match="num_images"):
        high_probability_certified_accuracy(0.5, 0, ALPHA)
    with pytest.raises(ValueError, match="rho"):
        high_probability_certified_accuracy(0.5, 100, ALPHA, rho=0.0)
    with pytest.raises(ValueError, match="bound"):
        high_probability_certified_accuracy(0.5, 100, ALPHA, bound="hoeffding")


# ---------------------------------------------------------------- paired difference of proportions
def test_paired_difference_interval_pins_the_published_example():
    """Fagerland, Lydersen & Laake, ch. 8 (the contingencytables R package's own test): complete
    response before and after consolidation therapy (Cavo et al., 2012), table [[59, 6], [16, 80]]:
    Newcombe square-and-add estimate -0.0621, 95 % CI -0.1186 to -0.0046 for p_before - p_after.
    Here: the difference second - first, so the interval is the published one negated."""
    low, high = paired_difference_interval(59, 6, 16, 80)
    assert (float(low), float(high)) == pytest.approx((0.0046, 0.1186), abs=5e-5)


def _newcombe_transcribed(a, b, c, d, z=1.959963984540054):
    """The same interval written out again, from the formulas, in another form (one table at a time)."""
    n = a + b + c + d

    def wilson(k):
        p = k / n
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b), wilson(a + c)
    denominator = math.sqrt((a + b) * (c + d) * (a + c) * (b + d)) if (a + b) * (c + d) * (a + c) * (b + d) else 0.0
    cross = a * d - b * c
    adjusted = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = adjusted / denominator if denominator else 0.0
    theta = p2 - p1
    low = theta - math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    high = theta + math.sqrt((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2)
    return low, high


def test_paired_difference_interval_equals_a_transcription_and_covers_the_truth():
    tables = [(1, 1, 7, 12), (36, 12, 2, 0), (10, 0, 0, 10), (0, 5, 1, 30), (40, 3, 9, 48)]
    low, high = paired_difference_interval(*np.array(tables).T)
    for i, t in enumerate(tables):
        assert (low[i], high[i]) == pytest.approx(_newcombe_transcribed(*t), abs=1e-12)
    # coverage of the true difference at 95 %: simulated paired tables of 60 images
    rng = np.random.default_rng(0)
    probs = np.array([0.55, 0.05, 0.15, 0.25])  # both, first only, second only, neither
    sims = rng.multinomial(60, probs, size=4000)
    lo, hi = paired_difference_interval(*sims.T)
    truth = probs[2] - probs[1]
    coverage = np.mean((lo <= truth) & (truth <= hi))
    assert 0.93 <= coverage <= 0.98, coverage
