"""Re-spacing a diffusion schedule onto a subset of its timesteps (guided-diffusion's respace.py).

DensePure's fast sampling runs S reverse steps at ``respaced_timesteps(t*, S)``; the step math
then uses the coefficients of the schedule re-spaced onto those timesteps (``respace``):
exactly ``SpacedDiffusion.__init__`` followed by ``GaussianDiffusion.__init__`` on the new
betas. Every coefficient is float64 numpy; ``_to_rows`` casts it to a working tensor.

Where the published DensePure code differs, we follow guided-diffusion (and the DensePure
paper): DensePure re-spaces with abar_prev = abar[0] (not 1) before the smallest timestep and
caps the re-spaced betas at 0.999, so its predicted x0 uses abar[t]/abar[0]; here abar_prev = 1
and no cap, so the predicted x0 is the same function of x_t as in DDS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from densepure_core.diffusion.schedule import DiffusionSchedule

__all__ = ["respaced_timesteps", "RespacedSchedule", "respace"]


def _to_rows(values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """float64 values ``[B]`` -> x's dtype and device, shaped ``[B, 1, ..., 1]``.

    Like guided-diffusion's ``_extract_into_tensor``: the cast happens after the float64 math.
    """
    v = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))




def _interpolated_log_variance(v: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor) -> torch.Tensor:
    """learned_range: frac log(beta_k) + (1 - frac) log(posterior variance_k), frac = (v + 1) / 2."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log



def respaced_timesteps(t_star: int, steps: int) -> list[int]:
    """DensePure's fast-sampling timesteps, descending: ``round(t* - i * (t*/S))``, i < S.

    The expression and the rounding are DensePure's own (``runners/diffpure_guided_densepure.py``:
    ``inter = t/S; [round(t - i*inter) for i in range(S)]``): Python's built-in ``round`` on a
    float, i.e. round-half-to-even (145, S=2 -> [145, 72], not 73).

    Args:
        t_star: the starting timestep (>= 1).
        steps: S, the number of denoiser calls, 1 <= S <= t* (S > t* would repeat timesteps).

    Returns:
        S distinct ints, ``[t*, ..., >= 1]``: the first is t*, the smallest round(t*/S) >= 1.
    """
    for name, v in (("t_star", t_star), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}")
    t_star, steps = int(t_star), int(steps)
    if steps < 1 or steps > t_star:
        raise ValueError(
            f"steps={steps} must be in 1..t*={t_star}: more steps than t* would repeat timesteps"
        )
    inter = t_star / steps
    ts = [round(t_star - i * inter) for i in range(steps)]
    # Spacing t*/S >= 1 and round() is monotone, so the values are distinct; keep it checked.
    assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 1, ts
    return ts


@dataclass(frozen=True, eq=False)
class RespacedSchedule:
    """guided-diffusion's SpacedDiffusion coefficients on a subset of timesteps.

    All arrays are float64 ``[N]`` indexed by the re-spaced index k = 0..N-1, k = 0 being the
    smallest used timestep; ``timesteps[k]`` is the original index (``timestep_map``).
    ``betas[k] = 1 - abar[timesteps[k]] / abar[timesteps[k-1]]`` with abar = 1 before k = 0, so
    ``alphas_cumprod[k] == abar[timesteps[k]]`` up to float64 rounding, and with all of
    0..t* used, ``betas`` equals the original betas[0..t*].

    At k = 0, ``posterior_mean_coef2 == 0`` and ``posterior_mean_coef1 == 1`` (to rounding),
    so the mean of the last step is the predicted x0. Its variance is never used: for N = 1
    (which guided-diffusion cannot build, an IndexError) ``posterior_log_variance_clipped`` is
    [-inf] and ``fixed_large_variance`` is ``betas``.
    """

    timesteps: tuple[int, ...]
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    fixed_large_variance: np.ndarray
    num_steps: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_steps", len(self.timesteps))

    def log_variance(self, k: int, variance_type: str, v: torch.Tensor | None,
                     like: torch.Tensor) -> torch.Tensor:
        """The reverse step's log variance at re-spaced index k, broadcastable to ``like``.

        fixed_small: log posterior variance (clipped); fixed_large: log of
        [posterior_variance[1], betas[1:]]; learned_range: frac log(beta_k) + (1 - frac)
        log_posterior_variance_clipped_k with frac = (v + 1) / 2 (v: ``[B, C, ...]``).
        """
        b = like.shape[0]
        if variance_type == "fixed_small":
            return _to_rows(np.full(b, self.posterior_log_variance_clipped[k]), like)
        if variance_type == "fixed_large":
            return _to_rows(np.full(b, np.log(self.fixed_large_variance[k])), like)
        if v is None:
            raise ValueError("learned_range needs the model's variance values v")
        return _interpolated_log_variance(v, *self.log_variance_bounds(k, like))

    def log_variance_bounds(self, k: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """learned_range's (min_log, max_log) at re-spaced index k, ``[B, 1, ..., 1]`` like ``like``."""
        b = like.shape[0]
        return (_to_rows(np.full(b, self.posterior_log_variance_clipped[k]), like),
                _to_rows(np.full(b, np.log(self.betas[k])), like))


def respace(schedule: DiffusionSchedule, timesteps: Sequence[int]) -> RespacedSchedule:
    """Re-space ``schedule`` onto ``timesteps`` (any order, distinct, in 0..T-1).

    Exactly SpacedDiffusion.__init__ followed by GaussianDiffusion.__init__ on the new betas.
    """
    ts = sorted(int(t) for t in timesteps)
    if not ts or len(set(ts)) != len(ts) or ts[0] < 0 or ts[-1] >= schedule.num_timesteps:
        raise ValueError(
            f"timesteps must be distinct ints in 0..{schedule.num_timesteps - 1}, got {list(timesteps)}"
        )
    last = 1.0
    new_betas = []
    for a in schedule.alphas_cumprod[ts]:
        new_betas.append(1 - a / last)
        last = a
    betas = np.array(new_betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    if len(ts) > 1:
        # log clipped because the posterior variance is 0 at k = 0 (guided-diffusion's comment).
        log_var_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        fixed_large = np.append(posterior_variance[1], betas[1:])
    else:
        log_var_clipped = np.array([-np.inf])
        fixed_large = betas.copy()
    coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    return RespacedSchedule(
        timesteps=tuple(ts), betas=betas, alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev, posterior_variance=posterior_variance,
        posterior_log_variance_clipped=log_var_clipped, posterior_mean_coef1=coef1,
        posterior_mean_coef2=coef2, fixed_large_variance=fixed_large,
    )
