"""sigma -> t*: pinned against the published t* values and both reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densepure_core.diffusion.noise_level import noise_to_signal, t_star

SIGMAS = (0.12, 0.25, 0.5, 1.0)


def _linear_abar() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def _cosine_abar(T: int = 4000) -> np.ndarray:
    # improved-diffusion's betas_for_alpha_bar, written out independently of schedule.py.
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    return np.cumprod(1.0 - betas)


def _carlini_t(abar: np.ndarray, sigma: float) -> int:
    # ethz-spylab/diffusion_denoised_smoothing certify.py: the while loop, starting at t = 1.
    target, real, t = sigma * 2, 0.0, 0
    while real < target:
        t += 1
        real = math.sqrt(1 - abar[t]) / math.sqrt(abar[t])
    return t


def _densepure_t(abar: np.ndarray, sigma: float) -> int:
    # DensePure runners/diffpure_guided_densepure.py: the bracket comparison.
    r = np.sqrt(1.0 / abar - 1)
    s = sigma * 2
    for t in range(len(r) - 1):
        if r[t] < s and r[t + 1] >= s:
            return t + 1 if s - r[t] > r[t + 1] - s else t
    raise AssertionError("no bracket")


@pytest.mark.parametrize("rule, expected", [
    ("first_at_or_above", (70, 145, 259, 396)),
    ("nearest", (70, 144, 258, 396)),
])
def test_linear_1000_published_t_star(rule, expected):
    abar = _linear_abar()
    assert tuple(t_star(abar, s, rule) for s in SIGMAS) == expected
    # Same answer from a torch float32 tensor (diffusers' own alphas_cumprod dtype).
    abar32 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    assert tuple(t_star(abar32, s, rule) for s in SIGMAS) == expected


def test_cosine_4000_published_t_star_is_the_first_at_or_above_rule():
    # The published 573/1158/1984/2809 (DDS, CIFAR-10) are Carlini's rule; "nearest" differs
    # by one at sigma = 0.12 and 0.5.
    abar = _cosine_abar()
    assert tuple(t_star(abar, s, "first_at_or_above") for s in SIGMAS) == (573, 1158, 1984, 2809)
    assert tuple(t_star(abar, s, "nearest") for s in SIGMAS) == (572, 1158, 1983, 2809)


@pytest.mark.parametrize("abar_fn", [_linear_abar, _cosine_abar])
def test_rules_match_the_reference_loops(abar_fn):
    abar = abar_fn()
    for sigma in np.linspace(0.02, 1.5, 37):
        assert t_star(abar, sigma, "first_at_or_above") == _carlini_t(abar, sigma)
        assert t_star(abar, sigma, "nearest") == _densepure_t(abar, sigma)


def test_default_rule_is_nearest_and_ratio():
    # 2 sigma = 0.5 lies between r_144 and r_145, nearer r_144.
    abar = _linear_abar()
    assert t_star(abar, 0.25) == 144
    r = noise_to_signal(abar)
    assert r.dtype == np.float64 and np.all(np.diff(r) > 0)
    np.testing.assert_allclose(r[144:146], [0.49942705, 0.50316235], atol=1e-8)


@pytest.mark.parametrize("sigma", [0.0, -0.25, float("nan"), float("inf")])
def test_non_positive_sigma_refused(sigma):
    with pytest.raises(ValueError, match="sigma"):
        t_star(_linear_abar(), sigma)


def test_sigma_beyond_schedule_refused_with_the_max():
    abar = _linear_abar()
    r_max = noise_to_signal(abar)[-1]
    assert t_star(abar, r_max / 2, "first_at_or_above") == 999
    with pytest.raises(ValueError, match=r"sigma=100.0 .*157\.4.*sigma <= 78\.7"):
        t_star(abar, 100.0)


def test_bad_rule_and_bad_schedule_refused():
    with pytest.raises(ValueError, match="rule"):
        t_star(_linear_abar(), 0.25, "closest")
    with pytest.raises(ValueError, match="1-D"):
        t_star(np.ones((2, 2)) * 0.5, 0.25)
