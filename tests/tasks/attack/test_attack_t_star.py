"""t* of the attack presets' DiffPure defenses: DiffPure's noise level on the presets' own schedules.

DiffPure (Nie et al. 2022) states t* as a time of its VP-SDE (beta_min 0.1, beta_max 20). On
the cosine 4000-step schedule of improved-diffusion's CIFAR-10 model a fraction of the steps is
another noise level (issue 24 item 3), so the presets say ``t_fraction_of: vp_sde`` and t* is the
timestep with the SDE's abar. Each schedule is the one the converted preset model carries
(``adm.build_scheduler``).
"""

import math

import numpy as np
import pytest

from densepure_core.models.adm import ADM_PRESETS, build_scheduler
from densepure_core.config.attack import AttackConfig
from densepure_core.config import load_config
from densepure_core.diffusion.noise_level import vp_sde_alpha_bar
from densepure_core.diffusion.schedule import DiffusionSchedule
from tasks.attack.plan import defense_t_star


def _schedule(preset: str) -> DiffusionSchedule:
    return DiffusionSchedule.from_scheduler(build_scheduler(ADM_PRESETS[preset]))


def _diffpure_alpha_bar(time: float) -> float:
    """Transcription of DiffPure's runners/diffpure_sde.py: alphas_cumprod_cont(t) =
    exp(-0.5 (beta_max - beta_min) t^2 - beta_min t), beta_min 0.1, beta_max 20."""
    return math.exp(-0.5 * (20 - 0.1) * time ** 2 - 0.1 * time)


@pytest.mark.parametrize("preset, model, expected", [
    ("attack_cifar10", "cifar10-improved", {"diffpure-linf": (0.1, 809), "diffpure-l2": (0.075, 611)}),
    ("attack_imagenet", "imagenet256-uncond", {"diffpure": (0.15, 149)}),
])
def test_preset_t_star_has_diffpures_alpha_bar(preset, model, expected):
    cfg = load_config(preset, model=AttackConfig)
    schedule = _schedule(model)
    abar = schedule.alphas_cumprod
    for defense in (d for d in cfg.defenses if d.kind == "purify"):
        time, t_expected = expected[defense.label]
        target = _diffpure_alpha_bar(time)
        assert defense.t_fraction == time and vp_sde_alpha_bar(time) == pytest.approx(target, rel=1e-12)
        t = defense_t_star(defense, schedule, cfg.t_star_rule)
        assert t == t_expected, defense.label
        # the nearest abar of the schedule: closer to DiffPure's than either neighbour
        assert abs(abar[t] - target) <= min(abs(abar[t - 1] - target), abs(abar[t + 1] - target))
        assert abs(abar[t] - target) < 1e-3
        # and not the fraction of steps, which on the cosine schedule is far less noise
        if model == "cifar10-improved":
            assert abar[round(time * len(abar))] - target > 0.04


def test_diffpure_alpha_bar_values():
    assert [round(vp_sde_alpha_bar(s), 4) for s in (0.075, 0.1, 0.15)] == [0.9385, 0.8963, 0.7875]


def test_on_the_linear_schedule_the_match_is_diffpures_discrete_index():
    """DiffPure's guided (ImageNet) and SDE runners diffuse with the discrete a[t - 1] of
    linspace(0.1 / 1000, 20 / 1000, 1000) for t = 1000 x time: the nearest abar is that index."""
    schedule = _schedule("imagenet256-uncond")
    a = np.cumprod(1 - np.linspace(0.1 / 1000, 20 / 1000, 1000))
    np.testing.assert_allclose(schedule.alphas_cumprod, a, rtol=1e-6)
    cfg = load_config("attack_imagenet", model=AttackConfig)
    d = next(d for d in cfg.defenses if d.kind == "purify")
    for time, t in ((0.075, 75), (0.1, 100), (0.15, 150)):
        vp = d.model_copy(update={"t_fraction": time})
        assert defense_t_star(vp, schedule, "nearest") == t - 1


def test_a_fraction_of_steps_is_still_the_default_and_keeps_old_hashes():
    cfg = load_config("attack_default", model=AttackConfig)
    assert all(d.t_fraction_of == "steps" for d in cfg.defenses)
    assert cfg.config_hash() == "2e68014edde9812e"  # the hash before t_fraction_of existed
    linear = DiffusionSchedule.linear()
    assert defense_t_star(cfg.defenses[1], linear, cfg.t_star_rule) == 100  # round(0.1 x 1000)
    assert [d.label for d in cfg.defenses] == ["none", "purify-t0.1-s4", "purify-t0.1-s4-k3"]
    vp = cfg.defenses[1].model_copy(update={"t_fraction_of": "vp_sde"})
    assert vp.label == "purify-vp0.1-s4" and defense_t_star(vp, linear, cfg.t_star_rule) == 99
