"""Purifiers: map Gaussian-noised copies in [0, 1] to denoised images in [0, 1].

Four kinds, one interface (``make_purifier``):

- ``"none"``: the identity; plain randomized smoothing (Cohen et al.): the classifier sees the
  unclipped copy x + sigma e.
- ``"one_shot"``: DDS (Carlini et al. 2022): one denoiser call at t*, the predicted x0.
- ``"densepure"``: DensePure's fast sampling (Xiao et al. 2023): S stochastic ancestral DDPM
  steps at timesteps round(t* - i t*/S), i = 0..S-1, on a schedule re-spaced on the fly.
- ``"full"``: the whole ancestral chain t*, t*-1, ..., 0 (t* + 1 denoiser calls). DensePure's
  and Carlini's "full" loops run ``range(t*)[::-1]``, i.e. they label the x_t* they start from
  as t* - 1; here the full chain starts at t* itself.

Every kind but "none" maps the copy to x_t* (``noisy_to_xt``) and runs a
``reverse.ReverseProcess`` over its timesteps: the one reverse step (``densepure_core/diffusion/reverse.py``)
and the re-spacing (``densepure_core/diffusion/respace.py``) are re-exported here.

Randomness: the reverse noise comes only from the caller: a noise source (``rng.NoiseSource``,
one stream per row), or fixed tensors. A row's result does not depend on the batch it is in, up
to the denoiser's own batch-size-dependent float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from densepure_core.diffusion.respace import RespacedSchedule, respace, respaced_timesteps
from densepure_core.diffusion.reverse import (Denoiser, ReverseProcess, StepCoefficients, UNetDenoiser, one_shot, predict_x0,
                                    reverse_process, unet_denoiser)
from densepure_core.diffusion.schedule import DiffusionSchedule

__all__ = [
    "KINDS",
    "Denoiser",
    "UNetDenoiser",
    "unet_denoiser",
    "noisy_to_xt",
    "predict_x0",
    "respaced_timesteps",
    "RespacedSchedule",
    "respace",
    "StepCoefficients",
    "ReverseProcess",
    "reverse_process",
    "one_shot",
    "PurifierProtocol",
    "Purifier",
    "make_purifier",
]

KINDS = ("none", "one_shot", "densepure", "full")


@runtime_checkable
class PurifierProtocol(Protocol):
    """What the smoothed classifier needs of a purifier (``Purifier`` and test stand-ins).

    ``purifier(x_noisy01 [B, C, H, W], noise) -> [B, C, H, W]``: ``noise`` is a noise source
    with B rows (``rng.NoiseSource``) when ``stochastic``, else None. A row's output depends
    only on that row and its noise stream. Outputs of a purifier that denoises are clipped to
    [0, 1] by the purifier; the identity ("none") returns its input unclipped.
    """

    @property
    def stochastic(self) -> bool:
        """Whether each call draws reverse-process noise."""

    @property
    def unet_calls_per_purification(self) -> int:
        """Denoiser calls per row and call (for the call counts)."""

    def __call__(self, x_noisy01: torch.Tensor, noise: Any) -> torch.Tensor: ...


# --------------------------------------------------------------------------- forward side
def noisy_to_xt(x_noisy01: torch.Tensor, abar: float) -> torch.Tensor:
    """A smoothing copy x + sigma e in [0, 1] -> the diffusion state at t*.

    x_t* = sqrt(abar_t*) (2 (x + sigma e) - 1) = sqrt(abar) x0 + sqrt(abar) 2 sigma e, which is
    exactly the forward marginal sqrt(abar) x0 + sqrt(1 - abar) eps when
    sqrt((1 - abar) / abar) = 2 sigma. Same shape and dtype as the input.
    """
    return math.sqrt(float(abar)) * (2.0 * x_noisy01 - 1.0)


# --------------------------------------------------------------------------- purifier
@dataclass(frozen=True, eq=False)
class Purifier:
    """A configured purifier: ``purifier(x_noisy01 [B, C, H, W], noise) -> [B, C, H, W]``.

    Implements ``PurifierProtocol``. "none" is the identity (plain randomized smoothing: the
    classifier sees the unclipped x + sigma e); every other kind maps the copy to x_t*
    (``noisy_to_xt``), runs its ``ReverseProcess`` and returns the clipped x0 mapped to [0, 1].

    Attributes:
        kind: one of ``KINDS``.
        denoiser, schedule: the model (None for "none").
        sigma: the smoothing noise level it was built for.
        t_star: the starting timestep (None for "none").
        timesteps: the original timesteps the denoiser is called at, descending ((): "none";
            (t*,): "one_shot"; S of them: "densepure"; t*..0: "full").
        process: the reverse chain (None for "none"); ``process.step`` is the one reverse step.
    """

    kind: str
    denoiser: Denoiser | None
    schedule: DiffusionSchedule | None
    sigma: float
    t_star: int | None
    timesteps: tuple[int, ...]
    process: ReverseProcess | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        process = None if self.kind == "none" else ReverseProcess(self.denoiser, self.schedule, self.timesteps)
        object.__setattr__(self, "process", process)

    @property
    def unet_calls_per_purification(self) -> int:
        """Denoiser calls per row: 0, 1, S or t* + 1."""
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        """Whether reverse noise is drawn (so a caller needs to pass a noise source)."""
        return self.draws > 0

    @property
    def draws(self) -> int:
        """Noise draws per purification: S - 1 for DensePure, t* for the full chain, else 0."""
        return 0 if self.process is None else self.process.draws

    def __call__(self, x_noisy01: torch.Tensor, noise: Any = None, *, grad: bool = False) -> torch.Tensor:
        """Purify a batch of noisy copies.

        Args:
            x_noisy01: ``[B, C, H, W]``, the smoothing copies x + sigma e (unclipped, [0, 1]
                scale).
            noise: when ``stochastic``: a noise source with B rows of shape ``[C, H, W]``
                (``rng.NoiseSource``), or a sequence of ``draws`` tensors ``[B, C, H, W]``
                (fixed noise); else ignored (may be None).
            grad: see ``ReverseProcess.run``.

        Returns:
            ``[B, C, H, W]`` in [0, 1] in the input's dtype; for "none", the input itself.
        """
        if self.kind == "none":
            return x_noisy01
        if x_noisy01.ndim != 4:
            raise ValueError(f"expected x_noisy01 [B, C, H, W], got shape {list(x_noisy01.shape)}")
        if self.stochastic:
            if noise is None:
                raise ValueError(f"the {self.kind!r} purifier draws reverse noise: pass a noise source")
            if hasattr(noise, "draw") and (len(noise) != x_noisy01.shape[0]
                                           or tuple(noise.shape) != tuple(x_noisy01.shape[1:])):
                raise ValueError(
                    f"the noise source has {len(noise)} rows of {list(noise.shape)}, "
                    f"batch is {list(x_noisy01.shape)}"
                )
        x_t = noisy_to_xt(x_noisy01, self.schedule.alphas_cumprod[self.t_star])
        x0 = self.process.run(x_t, noise if self.stochastic else None, grad=grad)
        # x0 is clipped to [-1, 1], so this is in [0, 1]: the purifier clips its own output.
        return (x0 + 1) / 2


def make_purifier(kind: str, denoiser: Denoiser | None, schedule: DiffusionSchedule | None,
                  sigma: float, *, steps: int = 1, t_star_rule: str = "nearest") -> Purifier:
    """Build a purifier.

    Args:
        kind: "none", "one_shot", "densepure" or "full".
        denoiser: the diffusion model (unused, may be None, for "none").
        schedule: its schedule (unused, may be None, for "none").
        sigma: the smoothing noise level; picks t* = ``schedule.t_star(sigma, t_star_rule)``.
        steps: S, DensePure's number of reverse steps (1 <= S <= t*); only read by "densepure".
        t_star_rule: "nearest" (DensePure) or "first_at_or_above" (Carlini et al.).

    Raises:
        ValueError: unknown kind, a missing model, a sigma the schedule cannot reach, or
            steps outside 1..t* for "densepure".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown purifier kind {kind!r}; expected one of {KINDS}")
    if kind == "none":
        return Purifier("none", None, None, float(sigma), None, ())
    if denoiser is None or schedule is None:
        raise ValueError(f"the {kind!r} purifier needs a denoiser and a schedule")
    t_star = schedule.t_star(sigma, t_star_rule)
    if kind == "one_shot":
        timesteps = (t_star,)
    elif kind == "densepure":
        timesteps = tuple(respaced_timesteps(t_star, steps))
    else:
        timesteps = tuple(range(t_star, -1, -1))
    return Purifier(kind, denoiser, schedule, float(sigma), t_star, timesteps)
