"""The ancestral reverse process: the one reverse step that every purifier, attack and trainer runs.

The step math mirrors guided-diffusion's ``GaussianDiffusion`` (``p_mean_variance``,
``q_posterior_mean_variance``, ``p_sample``) on ``SpacedDiffusion``'s re-spaced betas
(``densepure_core/diffusion/respace.py``): every coefficient is computed in float64 numpy, indexed, then
cast to the working dtype (that of x_t), and the predicted x0 is clipped to [-1, 1]
(``clip_denoised=True``, as DensePure and Carlini et al. run it). The denoiser always receives
the ORIGINAL timestep index, as SpacedDiffusion's ``_WrappedModel`` passes it.

:meth:`ReverseProcess.step` is the only place where a step's arithmetic is written. It caches
its coefficients on the device, takes its noise as an argument (a tensor, or a callable drawn
after the denoiser call is queued), and every operation is differentiable: certification (the
engine calls ``purify.Purifier``), attacks with exact gradients (checkpoint ``step`` per
denoiser call) or fixed ("deterministic white-box") noise, and ADDT training all run it. DDS's
one-shot denoising is the one-step chain.

Gradients: ``ReverseProcess.run``, ``reverse_process`` and ``one_shot`` run under
``torch.no_grad()`` unless given ``grad=True``; ``step`` never touches the grad mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from densepure_core.diffusion.respace import _interpolated_log_variance, _to_rows, respace
from densepure_core.diffusion.schedule import DiffusionSchedule

__all__ = ["Denoiser", "UNetDenoiser", "unet_denoiser", "predict_x0", "StepCoefficients", "StepNoise",
           "ReverseProcess", "reverse_process", "one_shot"]

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
        return self.unet(x_t.to(self._dtype(x_t)), t).sample.to(x_t.dtype)

    def _dtype(self, x_t: torch.Tensor) -> torch.dtype:
        # The first floating parameter's dtype, read at every call (the UNet may be cast after
        # wrapping), but cheaply: diffusers' ``unet.dtype`` walks every module (~1 ms a call on
        # the digits UNet), which the reverse loop would pay at every step.
        params = getattr(self.unet, "parameters", None)
        if params is not None:
            for p in params():
                if p.is_floating_point():
                    return p.dtype
        return getattr(self.unet, "dtype", x_t.dtype)

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


def _x0_coefficients(schedule: DiffusionSchedule, idx: np.ndarray,
                     like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(a, b) ``[B, 1, ..., 1]`` with x0 = a x_t - b out, for original timesteps ``idx [B]``.

    epsilon: a = sqrt(1/abar), b = sqrt(1/abar - 1); v_prediction: a = sqrt(abar),
    b = sqrt(1 - abar); sample: (None, None), the output is x0 itself.
    """
    abar = schedule.alphas_cumprod[idx]
    if schedule.prediction_type == "epsilon":
        return _to_rows(np.sqrt(1.0 / abar), like), _to_rows(np.sqrt(1.0 / abar - 1), like)
    if schedule.prediction_type == "v_prediction":
        return _to_rows(np.sqrt(abar), like), _to_rows(np.sqrt(1.0 - abar), like)
    return None, None


def _x0_from(prediction_type: str, a: torch.Tensor | None, b: torch.Tensor | None,
             x_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The predicted x0 (unclipped) from the model's mean output: the one place of this formula."""
    return out if prediction_type == "sample" else a * x_t - b * out




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
    x0 = _x0_from(schedule.prediction_type, *_x0_coefficients(schedule, idx, x_t), x_t, out)
    return x0.clamp(-1, 1) if clip else x0


# --------------------------------------------------------------------------- reverse process
@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """The tensors of one ancestral step for one batch shape, dtype and device.

    Every tensor is ``[B, 1, ..., 1]`` in x_t's dtype (the float64 math done first, then cast,
    like guided-diffusion's ``_extract_into_tensor``), except ``t``, a long ``[B]``.

    Attributes:
        t: the ORIGINAL timestep index, what the denoiser receives.
        x0_a, x0_b: x0 = x0_a x_t - x0_b out (None for sample prediction).
        mean_x0, mean_xt: the posterior mean coef1 x0 + coef2 x_t (None at the last step).
        log_var: the fixed (small or large) log variance (None at the last step and for
            learned_range).
        min_log, max_log: learned_range's bounds (None otherwise and at the last step).
    """

    t: torch.Tensor
    x0_a: torch.Tensor | None
    x0_b: torch.Tensor | None
    mean_x0: torch.Tensor | None = None
    mean_xt: torch.Tensor | None = None
    log_var: torch.Tensor | None = None
    min_log: torch.Tensor | None = None
    max_log: torch.Tensor | None = None


#: Noise for one step: a tensor ``[B, C, H, W]``, or a no-argument callable returning one,
#: called after the step's denoiser call is queued (so CPU noise generation overlaps the GPU).
StepNoise = torch.Tensor | Callable[[], torch.Tensor] | None


class ReverseProcess:
    """The ancestral reverse chain over given timesteps: the math of every step, exactly once.

    The scheduler owns the math and the caller loops, as in diffusers' pipelines: ``step(x, i, z)``
    is step i of the chain (i = 0 at ``timesteps[0]``, the largest), a pure, differentiable
    function of x and its noise z. Certification (``run``, ``Purifier``), attacks with exact
    gradients or fixed noise, and training all call it. The per-step coefficients are built
    once per batch shape, dtype and device and kept on the device (no host-to-device copy per
    step, which on CUDA would block the host, and nothing a CUDA graph cannot capture).

    Args:
        denoiser: the model, called once per step with the ORIGINAL timestep index ``[B]``.
        schedule: the model's schedule, re-spaced onto ``timesteps`` (``respace``).
        timesteps: strictly descending original indices: ``(t*,)`` for DDS one-shot,
            ``respaced_timesteps(t*, S)`` for DensePure, ``range(t*, -1, -1)`` for the full chain.
    """

    def __init__(self, denoiser: Denoiser, schedule: DiffusionSchedule, timesteps: Sequence[int]):
        ts = tuple(int(t) for t in timesteps)
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be non-empty and strictly descending, got {list(ts)}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.timesteps = ts
        self.spaced = respace(schedule, ts)
        self._cache: dict[tuple, list[StepCoefficients]] = {}

    @property
    def num_steps(self) -> int:
        """Denoiser calls per run."""
        return len(self.timesteps)

    @property
    def draws(self) -> int:
        """Noise draws per run: one per step but the last."""
        return self.num_steps - 1

    def coefficients(self, like: torch.Tensor) -> list[StepCoefficients]:
        """The coefficients of every step (index i as in ``step``) for batches like ``like``."""
        key = (like.shape[0], like.ndim, like.dtype, like.device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        sched, sp, b = self.schedule, self.spaced, like.shape[0]
        # A zero-element template: the helpers only read its ndim, dtype, device and rows.
        tmpl = torch.empty((b, *([0] * (like.ndim - 1))), dtype=like.dtype, device=like.device)
        steps = []
        for i, t in enumerate(self.timesteps):
            k = self.num_steps - 1 - i  # the re-spaced index, 0 at the last step
            a, bb = _x0_coefficients(sched, np.full(b, t), tmpl)
            c = dict(t=_row_timesteps(t, tmpl), x0_a=a, x0_b=bb)
            if k > 0:
                c["mean_x0"] = _to_rows(np.full(b, sp.posterior_mean_coef1[k]), tmpl)
                c["mean_xt"] = _to_rows(np.full(b, sp.posterior_mean_coef2[k]), tmpl)
                if sched.variance_type == "learned_range":
                    c["min_log"], c["max_log"] = sp.log_variance_bounds(k, tmpl)
                else:
                    c["log_var"] = sp.log_variance(k, sched.variance_type, None, tmpl)
            steps.append(StepCoefficients(**c))
        self._cache[key] = steps
        return steps

    def step(self, x: torch.Tensor, i: int, z: StepNoise = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i: from x at ``timesteps[i]`` to the next state.

        Args:
            x: ``[B, C, H, W]``.
            i: 0..num_steps-1.
            z: standard-normal noise ``[B, C, H, W]`` (or a callable giving it) for every step
                but the last; ignored at the last step. Grad mode is the caller's.

        Returns:
            ``(x_prev, x0)``: x0 the clipped predicted x0 and x_prev = mean + exp(log_var / 2) z
            with mean = coef1 x0 + coef2 x (guided-diffusion's ``p_sample`` on the re-spaced
            schedule); at the last step x_prev is x0 itself (the posterior mean there, since
            coef1 = 1 and coef2 = 0, and no noise is added at index 0).
        """
        c = self.coefficients(x)[i]
        out = self.denoiser(x, c.t)
        last = i == self.num_steps - 1
        if callable(z) and not last:
            z = z()  # after the denoiser call is queued: overlaps CPU noise with device work
        eps, v = _split_output(out, x, self.schedule)
        x0 = _x0_from(self.schedule.prediction_type, c.x0_a, c.x0_b, x, eps).clamp(-1, 1)
        if last:
            return x0, x0
        if z is None:
            raise ValueError(f"reverse step {i} (t={self.timesteps[i]}) needs noise z")
        mean = c.mean_x0 * x0 + c.mean_xt * x
        log_var = c.log_var if c.log_var is not None else _interpolated_log_variance(v, c.min_log, c.max_log)
        return mean + torch.exp(0.5 * log_var) * z.to(device=x.device, dtype=x.dtype), x0

    def run(self, x_t: torch.Tensor, noise: Any = None, *, grad: bool = False) -> torch.Tensor:
        """The whole chain from x_t at ``timesteps[0]``: the last step's clipped x0 ``[B, C, H, W]``.

        Args:
            x_t: ``[B, C, H, W]``.
            noise: a noise source (``rng.NoiseSource``: ``draw()`` is called exactly ``draws``
                times, after each step's denoiser call) or a sequence of ``draws`` tensors
                (fixed noise, e.g. a deterministic white-box attack). May be None for one step.
            grad: False (default) runs under ``torch.no_grad()``; True leaves grad mode alone.
        """
        if self.draws and noise is None:
            raise ValueError(f"a {self.num_steps}-step reverse process needs noise for its {self.draws} draws")
        fixed = None if noise is None or hasattr(noise, "draw") else list(noise)
        if fixed is not None and len(fixed) != self.draws:
            raise ValueError(f"fixed noise: {len(fixed)} tensors given, the chain draws {self.draws}")
        with _grad_context(grad):
            x = x0 = x_t
            for i in range(self.num_steps):
                z = None if i == self.draws else (fixed[i] if fixed is not None else noise.draw)
                x, x0 = self.step(x, i, z)
            return x0


def reverse_process(denoiser: Denoiser, schedule: DiffusionSchedule, x_t: torch.Tensor,
                    timesteps: Sequence[int], noise: Any, *, grad: bool = False) -> torch.Tensor:
    """``ReverseProcess(denoiser, schedule, timesteps).run(x_t, noise, grad=grad)``: x0 in [-1, 1]."""
    return ReverseProcess(denoiser, schedule, timesteps).run(x_t, noise, grad=grad)


def one_shot(denoiser: Denoiser, schedule: DiffusionSchedule, x_t: torch.Tensor, t_star: int, *,
             grad: bool = False) -> torch.Tensor:
    """DDS one-shot denoising: a single call at t*, the clipped predicted x0 ``[B, C, H, W]``.

    Equals guided-diffusion's ``p_sample(model, x_t, t*, clip_denoised=True)["pred_xstart"]``
    (the one-step chain: its only step is the last).
    """
    return ReverseProcess(denoiser, schedule, (t_star,)).run(x_t, None, grad=grad)
