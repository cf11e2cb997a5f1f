"""DiffusionSchedule: the betas of a trained diffusion model and how to read its output.

One small, immutable, float64 description of a DDPM-style model's schedule, whatever trained
it: guided-diffusion / improved-diffusion (``linear``, ``cosine``) or a diffusers
``DDPMScheduler`` (``from_scheduler``). The purifiers (``purify.py``) derive every coefficient
from ``betas`` in float64, as guided-diffusion does, and cast to the working dtype last.

- ``variance_type`` says how the reverse step's variance is chosen: ``"fixed_small"`` (the
  posterior variance, beta-tilde), ``"fixed_large"`` (beta), or ``"learned_range"`` (ADM,
  improved-diffusion: the model's second C output channels v in [-1, 1] interpolate between
  the two in log space).
- ``prediction_type`` says what the model's (first C) output channels are: ``"epsilon"``,
  ``"sample"`` (x0) or ``"v_prediction"``.

Example:
    >>> s = DiffusionSchedule.linear()
    >>> s.num_timesteps, s.t_star(0.25, "first_at_or_above"), s.t_star(0.25, "nearest")
    (1000, 145, 144)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from densepure_core.diffusion import noise_level

__all__ = ["VARIANCE_TYPES", "PREDICTION_TYPES", "DiffusionSchedule"]

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# diffusers' variance_type names -> ours. The "_log" variants only change how diffusers
# computes the same standard deviation (through a log), not the variance itself.
_DIFFUSERS_VARIANCE = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """A discrete diffusion schedule (t = 0..T-1) plus the model's output convention.

    Attributes:
        betas: float64 ``[T]``, each in (0, 1] (guided-diffusion's own check); read-only.
        variance_type: one of ``VARIANCE_TYPES``.
        prediction_type: one of ``PREDICTION_TYPES``.
        alphas_cumprod: float64 ``[T]``, abar_t = prod_{s<=t} (1 - beta_s); derived, read-only.
        num_timesteps: T.

    ``eq=False``: two schedules compare by identity (numpy arrays have no truth value).
    """

    betas: np.ndarray
    variance_type: str = "fixed_small"
    prediction_type: str = "epsilon"
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    num_timesteps: int = field(init=False)

    def __post_init__(self) -> None:
        # Our own float64 copy: callers may keep mutating the array they passed in.
        betas = np.array(self.betas, dtype=np.float64, copy=True)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0.0) & (betas <= 1.0)):
            raise ValueError("betas must lie in (0, 1]")
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {self.variance_type!r}; expected one of {VARIANCE_TYPES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        object.__setattr__(self, "betas", _readonly(betas))
        object.__setattr__(self, "alphas_cumprod", _readonly(np.cumprod(1.0 - betas)))
        object.__setattr__(self, "num_timesteps", int(betas.size))

    # ----------------------------------------------------------------- constructors
    # Defaults follow diffusers' DDPMScheduler (fixed_small, epsilon); pass the model's own.
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               *, variance_type: str = "fixed_small",
               prediction_type: str = "epsilon") -> DiffusionSchedule:
        """Ho et al.'s linear schedule: ``np.linspace(beta_start, beta_end, T)`` in float64.

        guided-diffusion's ``"linear"`` rescales the endpoints by 1000 / T for T != 1000; pass
        the scaled values here to reproduce that. (ADM-256 ImageNet: T = 1000, learned_range.)
        """
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
        return cls(betas, variance_type=variance_type, prediction_type=prediction_type)

    @classmethod
    def cosine(cls, num_timesteps: int = 4000, *, variance_type: str = "fixed_small",
               prediction_type: str = "epsilon") -> DiffusionSchedule:
        """improved-diffusion's cosine schedule (Nichol & Dhariwal 2021).

        alpha_bar(s) = cos(((s + 0.008) / 1.008) * pi / 2)^2 on s in [0, 1] and
        beta_t = min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), 0.999), computed with
        Python floats exactly as ``betas_for_alpha_bar`` does. Carlini et al.'s CIFAR-10 model
        (``cifar10_uncond_50M_500K``, learn_sigma) needs ``variance_type="learned_range"``.
        """
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                 for i in range(num_timesteps)]
        return cls(np.array(betas, dtype=np.float64), variance_type=variance_type,
                   prediction_type=prediction_type)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> DiffusionSchedule:
        """From a diffusers ``DDPMScheduler`` (its ``betas`` and ``config``).

        diffusers keeps betas in float32; they are promoted to float64 here and
        ``alphas_cumprod`` is recomputed in float64 (so it differs from the scheduler's float32
        cumprod by float32 rounding). Variance types map fixed_small/fixed_small_log ->
        fixed_small, fixed_large/fixed_large_log -> fixed_large, learned_range ->
        learned_range.

        Raises:
            ValueError: for any other variance type (e.g. ``"learned"``), a scheduler without
                one (e.g. DDIMScheduler: load the model's DDPMScheduler config instead), or an
                unknown prediction type.
        """
        config = scheduler.config  # a diffusers FrozenDict
        vt = config.get("variance_type")
        pt = config.get("prediction_type", "epsilon")
        if vt not in _DIFFUSERS_VARIANCE:
            raise ValueError(
                f"unsupported scheduler variance_type {vt!r} (from {type(scheduler).__name__}); "
                f"supported: {sorted(_DIFFUSERS_VARIANCE)}"
            )
        betas = scheduler.betas
        if hasattr(betas, "detach"):
            betas = betas.detach().cpu().double().numpy()
        return cls(np.asarray(betas, dtype=np.float64), variance_type=_DIFFUSERS_VARIANCE[vt],
                   prediction_type=pt)

    # ----------------------------------------------------------------- helpers
    def t_star(self, sigma: float, rule: str = "nearest") -> int:
        """The timestep matching smoothing noise ``sigma``: see ``noise_level.t_star``."""
        return noise_level.t_star(self.alphas_cumprod, sigma, rule)
