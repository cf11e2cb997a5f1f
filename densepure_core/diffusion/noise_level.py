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

__all__ = ["RULES", "noise_to_signal", "t_star"]

RULES = ("nearest", "first_at_or_above")


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
