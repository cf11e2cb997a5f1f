"""sigma -> t*: the diffusion timestep whose noise level matches a randomized-smoothing sigma.

A smoothing copy x + sigma * e of an image x in [0, 1] is, in the diffusion model's [-1, 1]
range, (2x - 1) + 2 sigma e. Scaled by sqrt(abar_t), that is exactly the forward marginal
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps when the noise-to-signal ratio

    r_t = sqrt((1 - abar_t) / abar_t)

equals 2 sigma (Carlini et al. 2022, "DDS"; DensePure, Xiao et al. 2023). Schedules are
discrete, so r_t only brackets 2 sigma; the two published codes round differently:

- ``"first_at_or_above"`` (Carlini et al.): the first t with r_t >= 2 sigma. Their loop starts
  at t = 1, so the two agree except when 2 sigma <= r_0 (sigma < 0.005 on the linear schedule),
  where this function returns 0.
- ``"nearest"`` (DensePure): argmin_t |r_t - 2 sigma|; a tie goes to the smaller t, as in
  DensePure's bracket comparison.

Works with any schedule given as its ``alphas_cumprod`` (numpy or torch, index t = 0..T-1);
values are promoted to float64 before comparing.

The same matching places a noise level defined on another process: DiffPure (Nie et al. 2022)
states t* as a time of the VP-SDE (beta_min 0.1, beta_max 20), whose abar at time s is
:func:`vp_sde_alpha_bar`; :func:`t_star_at_alpha_bar` finds the timestep of any schedule with that
abar (the sigma above with abar = 1 / (1 + 4 sigma^2)). A fraction of steps is the same noise
level only on the schedule that discretises the SDE (linear, 1000 steps); on improved-diffusion's
cosine schedule 0.1 of its 4000 steps is abar 0.972 against the SDE's 0.896.

Example:
    >>> import numpy as np
    >>> abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    >>> t_star(abar, 0.25, "first_at_or_above"), t_star(abar, 0.25, "nearest")
    (145, 144)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["RULES", "VP_SDE_BETA_MIN", "VP_SDE_BETA_MAX", "noise_to_signal", "t_star", "vp_sde_alpha_bar",
           "t_star_at_alpha_bar"]

RULES = ("nearest", "first_at_or_above")
#: The VP-SDE of DiffPure and score_sde (beta(s) = beta_min + s (beta_max - beta_min), s in [0, 1]).
VP_SDE_BETA_MIN, VP_SDE_BETA_MAX = 0.1, 20.0


def _as_float64(alphas_cumprod: Any) -> np.ndarray:
    # torch tensors (possibly on a GPU, possibly requiring grad) and numpy arrays alike.
    if hasattr(alphas_cumprod, "detach"):
        alphas_cumprod = alphas_cumprod.detach().cpu().double().numpy()
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if abar.ndim != 1 or abar.size == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {abar.shape}")
    if not np.all((abar >= 0.0) & (abar <= 1.0)):
        raise ValueError("alphas_cumprod must lie in [0, 1]")
    return abar


def noise_to_signal(alphas_cumprod: Any) -> np.ndarray:
    """r_t = sqrt((1 - abar_t) / abar_t) for every t, float64 ``[T]``.

    A zero abar_t (zero-terminal-SNR schedules) gives r_t = inf.
    """
    abar = _as_float64(alphas_cumprod)
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - abar) / abar)


def t_star(alphas_cumprod: Any, sigma: float, rule: str = "nearest") -> int:
    """The timestep whose noise-to-signal ratio matches 2 sigma.

    Args:
        alphas_cumprod: abar_t for t = 0..T-1 (numpy array or torch tensor, any float dtype).
        sigma: the smoothing noise level in [0, 1] pixel units (> 0).
        rule: ``"nearest"`` (DensePure) or ``"first_at_or_above"`` (Carlini et al.).

    Returns:
        t* in 0..T-1 (a Python int).

    Raises:
        ValueError: for an unknown rule, sigma <= 0 or not finite, or 2 sigma beyond the
            schedule's largest noise-to-signal ratio (the message names sigma and the largest
            sigma the schedule reaches).
    """
    if rule not in RULES:
        raise ValueError(f"unknown t* rule {rule!r}; expected one of {RULES}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0.0:
        raise ValueError(f"sigma must be a positive finite number, got sigma={sigma}")
    r = noise_to_signal(alphas_cumprod)
    target = 2.0 * sigma
    r_max = float(np.max(r))
    if target > r_max:
        raise ValueError(
            f"sigma={sigma} is beyond this schedule's largest noise level: its largest "
            f"sqrt((1 - abar)/abar) is {r_max:.6g}, i.e. sigma <= {r_max / 2:.6g} "
            f"(T={r.size} steps)"
        )
    if rule == "first_at_or_above":
        # argmax of a boolean array is the first True; one exists since target <= r_max.
        return int(np.argmax(r >= target))
    # np.argmin returns the first minimum, so ties go to the smaller t (as DensePure does).
    return int(np.argmin(np.abs(r - target)))


def vp_sde_alpha_bar(time: float, beta_min: float = VP_SDE_BETA_MIN, beta_max: float = VP_SDE_BETA_MAX) -> float:
    """abar(s) = exp(-(beta_min s + (beta_max - beta_min) s^2 / 2)) of the VP-SDE at time s in (0, 1].

    DiffPure's t* = 0.1 (CIFAR-10 L_inf) is abar 0.8963, 0.075 (L_2) 0.9385, 0.15 (ImageNet) 0.7875.
    """
    time = float(time)
    if not (0.0 < time <= 1.0):
        raise ValueError(f"a VP-SDE time must be in (0, 1], got {time}")
    return math.exp(-(beta_min * time + 0.5 * (beta_max - beta_min) * time * time))


def t_star_at_alpha_bar(alphas_cumprod: Any, alpha_bar: float, rule: str = "nearest") -> int:
    """The timestep whose abar_t matches ``alpha_bar`` in (0, 1): :func:`t_star` at the sigma
    with the same noise-to-signal ratio, sqrt((1 - abar) / abar) = 2 sigma (same rules)."""
    alpha_bar = float(alpha_bar)
    if not (0.0 < alpha_bar < 1.0):
        raise ValueError(f"alpha_bar must be in (0, 1), got {alpha_bar}")
    return t_star(alphas_cumprod, math.sqrt((1.0 - alpha_bar) / alpha_bar) / 2.0, rule)
