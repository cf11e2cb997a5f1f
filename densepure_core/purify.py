"""Purifiers: map Gaussian-noised copies in [0, 1] to denoised images in [0, 1].

Four kinds, one interface (``make_purifier``):

- ``"none"``: the identity; plain randomized smoothing (Cohen et al.).
- ``"one_shot"``: DDS (Carlini et al. 2022): one denoiser call at t*, the predicted x0.
- ``"densepure"``: DensePure's fast sampling (Xiao et al. 2023): S stochastic ancestral DDPM
  steps at timesteps round(t* - i t*/S), i = 0..S-1, on a schedule re-spaced on the fly.
- ``"full"``: the whole ancestral chain t*, t*-1, ..., 0 (t* + 1 denoiser calls).

The step math mirrors guided-diffusion's ``GaussianDiffusion`` (``p_mean_variance``,
``q_posterior_mean_variance``, ``p_sample``) on ``SpacedDiffusion``'s re-spaced betas
(``respace.py``): every coefficient is computed in float64 numpy, indexed, then cast to the
working dtype (that of x_t), and the predicted x0 is clipped to [-1, 1] (``clip_denoised=True``,
as DensePure and Carlini et al. run it). The denoiser always receives the ORIGINAL timestep
index, as SpacedDiffusion's ``_WrappedModel`` passes it.

Where the published DensePure code differs, we follow guided-diffusion (and the DensePure
paper) and say so:

- DensePure re-spaces with abar_prev = abar[0] (not 1) before the smallest timestep and caps
  the re-spaced betas at 0.999, so its predicted x0 uses abar[t]/abar[0]; respace.py (here)
  uses abar_prev = 1 and no cap, so the predicted x0 is the same function of x_t as in DDS.
- DensePure's and Carlini's "full" loops run ``range(t*)[::-1]``, i.e. they label the x_t* they
  start from as t* - 1; here the full chain starts at t* itself.

Randomness: the reverse noise comes only from a ``RowNoise`` (one generator per row, drawn on
the CPU), so a row's result does not depend on the batch it is in, up to the denoiser's own
batch-size-dependent float rounding.

Gradients: ``Purifier.__call__``, ``reverse_process`` and ``one_shot`` run under
``torch.no_grad()`` unless given ``grad=True``; ``reverse_step`` never touches the grad mode and
takes its noise as a tensor, so an attack can checkpoint it per denoiser call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from densepure_core.rng import RowNoise
from densepure_core.schedule import DiffusionSchedule

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
    "reverse_step",
    "reverse_process",
    "one_shot",
    "Purifier",
    "make_purifier",
]

KINDS = ("none", "one_shot", "densepure", "full")

#: ``(x_t [B, C, H, W], t [B] long) -> [B, C, H, W]``, or ``[B, 2C, H, W]`` for learned-range
#: models (second half: the variance interpolation v in [-1, 1]).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- denoisers
class UNetDenoiser:
    """A diffusers ``UNet2DModel`` as a ``Denoiser``: returns ``unet(x_t, t).sample``.

    The input is cast to the UNet's dtype (e.g. fp16) and the output back to the input's, so
    the step math keeps the dtype of x_t whatever the UNet runs in.
    """

    def __init__(self, unet: Any):
        self.unet = unet

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = getattr(self.unet, "dtype", x_t.dtype)
        return self.unet(x_t.to(dtype), t).sample.to(x_t.dtype)

    def __repr__(self) -> str:
        return f"UNetDenoiser({type(self.unet).__name__})"


def unet_denoiser(unet: Any) -> UNetDenoiser:
    """Wrap a diffusers ``UNet2DModel`` as a ``Denoiser`` (see ``UNetDenoiser``)."""
    return UNetDenoiser(unet)


# --------------------------------------------------------------------------- helpers
def _row_timesteps(t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a long tensor ``[B]`` on x's device (an int is repeated for every row)."""
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        return t
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _to_rows(values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """float64 values ``[B]`` -> x's dtype and device, shaped ``[B, 1, ..., 1]``.

    Like guided-diffusion's ``_extract_into_tensor``: the cast happens after the float64 math.
    """
    v = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _split_output(model_out: torch.Tensor, x: torch.Tensor,
                  schedule: DiffusionSchedule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean part ``[B, C, ...]``, variance values v ``[B, C, ...]`` or None)."""
    c = x.shape[1]
    if schedule.variance_type == "learned_range":
        if model_out.shape[1] != 2 * c or model_out.shape[0] != x.shape[0]:
            raise ValueError(
                f"a learned_range denoiser must return [B, 2C, ...] = {[x.shape[0], 2 * c]}+..., "
                f"got {list(model_out.shape)}"
            )
        return model_out[:, :c], model_out[:, c:]
    if model_out.shape != x.shape:
        hint = (" (2C channels: set the schedule's variance_type='learned_range')"
                if model_out.shape[1] == 2 * c else "")
        raise ValueError(f"denoiser output {list(model_out.shape)} != x_t {list(x.shape)}{hint}")
    return model_out, None


def _grad_context(grad: bool) -> contextlib.AbstractContextManager:
    # grad=True leaves the caller's mode alone (it may itself be inside no_grad on purpose).
    return contextlib.nullcontext() if grad else torch.no_grad()


# --------------------------------------------------------------------------- forward side
def noisy_to_xt(x_noisy01: torch.Tensor, abar: float) -> torch.Tensor:
    """A smoothing copy x + sigma e in [0, 1] -> the diffusion state at t*.

    x_t* = sqrt(abar_t*) (2 (x + sigma e) - 1) = sqrt(abar) x0 + sqrt(abar) 2 sigma e, which is
    exactly the forward marginal sqrt(abar) x0 + sqrt(1 - abar) eps when
    sqrt((1 - abar) / abar) = 2 sigma. Same shape and dtype as the input.
    """
    return math.sqrt(float(abar)) * (2.0 * x_noisy01 - 1.0)


def predict_x0(model_out: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor,
               schedule: DiffusionSchedule, *, clip: bool = True) -> torch.Tensor:
    """The model's prediction of x0 from x_t (guided-diffusion's ``pred_xstart``).

    Args:
        model_out: ``[B, C, H, W]``, or ``[B, 2C, H, W]`` for a learned_range schedule (the
            variance half is ignored).
        x_t: ``[B, C, H, W]``.
        t: the original timestep index, an int or a long tensor ``[B]``.
        schedule: gives abar_t and the prediction type:
            epsilon: x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps;
            sample: x0 = model_out;
            v_prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v.
        clip: clamp to [-1, 1] (``clip_denoised``; on by default, as DDS and DensePure run).

    Returns:
        ``[B, C, H, W]`` in x_t's dtype; in [-1, 1] when ``clip``.
    """
    # Already split (C channels), or a learned_range model's raw [B, 2C, ...] output.
    out = model_out if model_out.shape == x_t.shape else _split_output(model_out, x_t, schedule)[0]
    # Host-side indices: an int timestep (the reverse loop's case) never syncs with the device.
    if isinstance(t, torch.Tensor):
        idx = np.broadcast_to(t.detach().cpu().numpy().reshape(-1), (x_t.shape[0],))
    else:
        idx = np.full(x_t.shape[0], int(t))
    abar = schedule.alphas_cumprod[idx]
    if schedule.prediction_type == "epsilon":
        x0 = _to_rows(np.sqrt(1.0 / abar), x_t) * x_t - _to_rows(np.sqrt(1.0 / abar - 1), x_t) * out
    elif schedule.prediction_type == "sample":
        x0 = out
    else:  # v_prediction
        x0 = _to_rows(np.sqrt(abar), x_t) * x_t - _to_rows(np.sqrt(1.0 - abar), x_t) * out
    return x0.clamp(-1, 1) if clip else x0


# --------------------------------------------------------------------------- re-spacing
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
        min_log = _to_rows(np.full(b, self.posterior_log_variance_clipped[k]), like)
        max_log = _to_rows(np.full(b, np.log(self.betas[k])), like)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log


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


# --------------------------------------------------------------------------- reverse process
def reverse_step(denoiser: Denoiser, schedule: DiffusionSchedule, spaced: RespacedSchedule,
                 x: torch.Tensor, k: int, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step from re-spaced index k (original timestep ``spaced.timesteps[k]``).

    Args:
        denoiser: called once with x and the ORIGINAL timestep ``[B]``.
        schedule, spaced: the original schedule (prediction type, abar for x0) and its
            re-spacing (posterior mean and variance).
        x: ``[B, C, H, W]`` at that timestep.
        k: re-spaced index; k = 0 is the last step.
        z: standard-normal noise ``[B, C, H, W]`` for k > 0; ignored (may be None) at k = 0.

    Returns:
        ``(x_prev, pred_x0)``: x_prev = mean + exp(log_var / 2) z, with mean =
        coef1_k x0 + coef2_k x; at k = 0, x_prev is pred_x0 itself (guided-diffusion's mean
        there, since coef1_0 = 1 and coef2_0 = 0, and p_sample adds no noise at index 0).
        Grad mode is the caller's.
    """
    t = spaced.timesteps[k]
    out = denoiser(x, _row_timesteps(t, x))
    eps, v = _split_output(out, x, schedule)
    x0 = predict_x0(eps, x, t, schedule)
    if k == 0:
        return x0, x0
    if z is None:
        raise ValueError(f"reverse step at re-spaced index {k} (t={t}) needs noise z")
    b = x.shape[0]
    mean = (_to_rows(np.full(b, spaced.posterior_mean_coef1[k]), x) * x0
            + _to_rows(np.full(b, spaced.posterior_mean_coef2[k]), x) * x)
    log_var = spaced.log_variance(k, schedule.variance_type, v, x)
    return mean + torch.exp(0.5 * log_var) * z.to(device=x.device, dtype=x.dtype), x0


def reverse_process(denoiser: Denoiser, schedule: DiffusionSchedule, x_t: torch.Tensor,
                    timesteps: Sequence[int], noise: RowNoise | None, *,
                    grad: bool = False) -> torch.Tensor:
    """Run the ancestral reverse chain over ``timesteps`` (descending) and return x0.

    Args:
        denoiser: the model; called ``len(timesteps)`` times, with the original timesteps.
        schedule: the model's schedule; re-spaced onto ``timesteps`` on the fly.
        x_t: ``[B, C, H, W]``, the state at ``timesteps[0]``.
        timesteps: strictly descending original indices: ``respaced_timesteps(t*, S)`` for
            DensePure, ``list(range(t*, -1, -1))`` for the full chain.
        noise: the reverse-process noise; ``noise.draw()`` is called exactly
            ``len(timesteps) - 1`` times (none after the last step). May be None for one step.
        grad: False (default) runs under ``torch.no_grad()``; True leaves grad mode alone.

    Returns:
        ``[B, C, H, W]`` in [-1, 1]: the last step's predicted x0 (clipped).
    """
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be non-empty and strictly descending, got {ts}")
    if len(ts) > 1 and noise is None:
        raise ValueError(f"a {len(ts)}-step reverse process needs a RowNoise for its noise")
    spaced = respace(schedule, ts)
    n = len(ts)
    with _grad_context(grad):
        x = x_t
        for k in range(n - 1, -1, -1):
            # Drawn out here, not inside reverse_step, so that a checkpointed step recomputes
            # with the same z instead of advancing the generators again. Each row has its own
            # generator, so drawing before the denoiser call changes nothing.
            z = noise.draw() if k > 0 else None
            x, x0 = reverse_step(denoiser, schedule, spaced, x, k, z)
        return x0


def one_shot(denoiser: Denoiser, schedule: DiffusionSchedule, x_t: torch.Tensor, t_star: int, *,
             grad: bool = False) -> torch.Tensor:
    """DDS one-shot denoising: a single call at t*, the clipped predicted x0 ``[B, C, H, W]``.

    Equals guided-diffusion's ``p_sample(model, x_t, t*, clip_denoised=True)["pred_xstart"]``.
    """
    with _grad_context(grad):
        out = denoiser(x_t, _row_timesteps(t_star, x_t))
        return predict_x0(out, x_t, t_star, schedule)


# --------------------------------------------------------------------------- purifier
@dataclass(frozen=True, eq=False)
class Purifier:
    """A configured purifier: ``purifier(x_noisy01 [B, C, H, W], noise) -> [B, C, H, W]``.

    Attributes:
        kind: one of ``KINDS``.
        denoiser, schedule: the model (None for "none").
        sigma: the smoothing noise level it was built for.
        t_star: the starting timestep (None for "none").
        timesteps: the original timesteps the denoiser is called at, descending ((): "none";
            (t*,): "one_shot"; S of them: "densepure"; t*..0: "full").
    """

    kind: str
    denoiser: Denoiser | None
    schedule: DiffusionSchedule | None
    sigma: float
    t_star: int | None
    timesteps: tuple[int, ...]

    @property
    def unet_calls_per_purification(self) -> int:
        """Denoiser calls per row: 0, 1, S or t* + 1."""
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        """Whether reverse noise is drawn (so a caller needs to build a RowNoise)."""
        return self.kind in ("densepure", "full") and len(self.timesteps) > 1

    def __call__(self, x_noisy01: torch.Tensor, noise: RowNoise | None = None, *,
                 grad: bool = False) -> torch.Tensor:
        """Purify a batch of noisy copies.

        Args:
            x_noisy01: ``[B, C, H, W]``, the smoothing copies x + sigma e (unclipped, [0, 1]
                scale).
            noise: a ``RowNoise`` with B rows of shape ``[C, H, W]`` when ``stochastic``; else
                ignored (may be None).
            grad: see ``reverse_process``.

        Returns:
            ``[B, C, H, W]`` in [0, 1] in the input's dtype; for "none", the input itself.
        """
        if self.kind == "none":
            return x_noisy01
        if x_noisy01.ndim != 4:
            raise ValueError(f"expected x_noisy01 [B, C, H, W], got shape {list(x_noisy01.shape)}")
        if self.stochastic:
            if noise is None:
                raise ValueError(f"the {self.kind!r} purifier draws reverse noise: pass a RowNoise")
            if len(noise) != x_noisy01.shape[0] or tuple(noise.shape) != tuple(x_noisy01.shape[1:]):
                raise ValueError(
                    f"RowNoise has {len(noise)} rows of {list(noise.shape)}, "
                    f"batch is {list(x_noisy01.shape)}"
                )
        x_t = noisy_to_xt(x_noisy01, self.schedule.alphas_cumprod[self.t_star])
        if self.kind == "one_shot":
            x0 = one_shot(self.denoiser, self.schedule, x_t, self.t_star, grad=grad)
        else:
            x0 = reverse_process(self.denoiser, self.schedule, x_t, self.timesteps,
                                 noise if self.stochastic else None, grad=grad)
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
