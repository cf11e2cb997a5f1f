"""DiffusionSchedule: constructors pinned against guided-diffusion's formulas and diffusers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from diffusers import DDPMScheduler

from densepure_core.diffusion.schedule import DiffusionSchedule


def test_linear():
    s = DiffusionSchedule.linear()
    assert s.num_timesteps == 1000 and s.betas.dtype == np.float64
    assert s.betas[0] == 1e-4 and s.betas[-1] == 0.02
    np.testing.assert_array_equal(s.alphas_cumprod, np.cumprod(1.0 - s.betas))
    assert (s.variance_type, s.prediction_type) == ("fixed_small", "epsilon")
    assert s.t_star(0.25) == 144 and s.t_star(0.25, "first_at_or_above") == 145


def test_cosine_matches_improved_diffusion_and_diffusers():
    s = DiffusionSchedule.cosine()
    assert s.num_timesteps == 4000 and s.betas.dtype == np.float64
    assert s.betas[-1] == 0.999  # the max_beta cap
    np.testing.assert_allclose(s.betas[:3], [9.8658188e-06, 1.0169415e-05, 1.0473014e-05],
                               rtol=1e-7)
    # diffusers' squaredcos_cap_v2 is the same formula, stored in float32.
    ref = DDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2").betas
    np.testing.assert_allclose(s.betas, ref.double().numpy(), rtol=1e-6)
    assert [s.t_star(x, "first_at_or_above") for x in (0.12, 0.25, 0.5, 1.0)] == [573, 1158, 1984, 2809]


@pytest.mark.parametrize("diffusers_vt, ours", [
    ("fixed_small", "fixed_small"), ("fixed_small_log", "fixed_small"),
    ("fixed_large", "fixed_large"), ("fixed_large_log", "fixed_large"),
    ("learned_range", "learned_range"),
])
def test_from_scheduler_variance_mapping(diffusers_vt, ours):
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=diffusers_vt,
                          prediction_type="v_prediction")
    s = DiffusionSchedule.from_scheduler(sched)
    assert (s.variance_type, s.prediction_type) == (ours, "v_prediction")
    assert s.betas.dtype == np.float64
    np.testing.assert_array_equal(s.betas, sched.betas.double().numpy())
    np.testing.assert_allclose(s.alphas_cumprod, sched.alphas_cumprod.double().numpy(), rtol=1e-5)


def test_from_scheduler_refuses_learned_variance():
    with pytest.raises(ValueError, match="'learned'"):
        DiffusionSchedule.from_scheduler(DDPMScheduler(variance_type="learned"))


def test_frozen_and_read_only():
    betas = np.linspace(1e-4, 0.02, 10)
    s = DiffusionSchedule(betas)
    betas[0] = 0.5  # the caller's array is copied
    assert s.betas[0] == 1e-4
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.variance_type = "fixed_large"  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.betas[0] = 0.1


@pytest.mark.parametrize("kwargs, match", [
    (dict(variance_type="learned"), "variance_type"),
    (dict(prediction_type="x0"), "prediction_type"),
])
def test_bad_types_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionSchedule(np.full(10, 0.01), **kwargs)


@pytest.mark.parametrize("betas", [np.zeros(5), np.full(5, 1.5), np.ones((2, 2)) * 0.1, np.array([])])
def test_bad_betas_refused(betas):
    with pytest.raises(ValueError, match="betas"):
        DiffusionSchedule(betas)
