"""ADDT's training math (Liu et al. 2024; reference.md section 5): pure functions, no training loop.

Adversarial denoising diffusion training fine-tunes an epsilon-prediction diffusion model so that
purification counters adversarial perturbations, not only Gaussian noise. Per training image
x0 in [-1, 1] with label y and timestep t:

- :func:`addt_lambda`: lambda_t = clamp(0.03 sqrt(abar_t) / sqrt(1 - abar_t), 0, 0.3), the weight of
  the adversarial part of the noise;
- :func:`cgpo`: classifier-guided perturbation optimisation: 5 iterations from delta ~ N(0, I);
  each iteration mixes a fresh N(0, I) draw eps_i with delta (as the reference loop draws its
  noise inside the loop), takes the classifier's cross-entropy on the one-step estimate x0_hat
  (unclamped, mapped to [0, 1]) and adds its gradient w.r.t. delta to g (accumulated across
  iterations, never reset: a sum over noise draws, an expectation over the mixing noise);
  delta = RBGM(g);
- :func:`rbgm`: the rank-based Gaussian mapping: per (image, channel) row, a fresh sorted N(0, 1)
  sample placed in the rank order of g, so every element stays marginally N(0, 1);
- :func:`addt_loss`: MSE(eps_theta(x_t, t), sqrt(1 - lambda^2) eps' + lambda delta) with fresh eps',
  x_t the forward marginal with that mixed noise;
- the L_inf variant (:func:`linf_perturbation`, :func:`linf_ratio`, :func:`linf_loss`): delta from
  5 signed-gradient steps (8/255, step 4/255, gradient reset each step, a fresh eps_i each step,
  x0 + delta a valid image), mixed as eps + r_t delta with r_t = clip(sqrt(abar) / sqrt(1 - abar), 0, 10);
- :func:`ema_decay`: min(0.9999, 1 - (1 + step)^-0.75).

Gradients: CGPO and the L_inf steps differentiate w.r.t. delta only (``torch.autograd.grad`` with
delta as the only input), so no parameter gradient is left behind for the training step (the
reference EDM code accumulates them into the model's ``.grad``: a bug not copied; tested).
Randomness comes from the caller: RBGM's sorted samples from a numpy ``Generator`` (full-seed
Philox, ``rng.row_generator``), every other draw as a tensor argument (CGPO's mixing noise as one
tensor per iteration: passing the same tensor every time reproduces the fixed-draw variant that
this project ran before issue 24, for comparison only).

The training step that calls them is :mod:`densepure_core.addt.trainer`; the job that runs it on
Ray Train is ``densepure train-addt`` (tasks/train_addt/train.py). These functions are pinned against a
transcription of the reference code's formulas in ``tests/densepure_core/addt/test_addt.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["addt_lambda", "linf_ratio", "rbgm", "x0_estimate", "cgpo", "addt_loss", "linf_perturbation",
           "linf_loss", "ema_decay"]

#: ``(x_t [B, C, H, W], t [B] long) -> eps [B, C, H, W]``: the model being trained.
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(x01 [B, C, H, W] in [0, 1]) -> logits [B, classes]``: the frozen classifier with its preprocessing.
Logits = Callable[[torch.Tensor], torch.Tensor]


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def addt_lambda(abar: torch.Tensor) -> torch.Tensor:
    """lambda_t = clamp(0.03 sqrt(abar) / sqrt(1 - abar), 0, 0.3), elementwise (abar ``[B]``)."""
    return (0.03 * abar.sqrt() / (1 - abar).sqrt()).clamp(0.0, 0.3)


def linf_ratio(abar: torch.Tensor) -> torch.Tensor:
    """r_t = clip(sqrt(abar) / sqrt(1 - abar), 0, 10), the L_inf variant's mixing weight."""
    return (abar.sqrt() / (1 - abar).sqrt()).clamp(0.0, 10.0)


def rbgm(g: torch.Tensor, generator: np.random.Generator | Sequence[np.random.Generator]) -> torch.Tensor:
    """Rank-based Gaussian mapping of ``g`` ``[B, C, H, W]`` (or any ``[B, C, ...]``).

    Each (image, channel) row of n = H*W values gets a fresh sorted N(0, 1) sample of length n
    (float32), drawn row after row from ``generator``, or, given one generator per image, image
    i's C rows from ``generator[i]`` (so an image's draws do not depend on its batch): the element
    of rank r in the row of g receives the r-th smallest value. Same shape, dtype and device as
    g; rank-preserving per row (ties in g keep their order of appearance, ``argsort`` being stable).
    """
    rows = g.detach().reshape(g.shape[0] * g.shape[1], -1)
    if isinstance(generator, np.random.Generator):
        z = generator.standard_normal(tuple(rows.shape), dtype=np.float32)
    else:
        if len(generator) != g.shape[0]:
            raise ValueError(f"rbgm: {len(generator)} generators for {g.shape[0]} images")
        z = np.concatenate([gen.standard_normal((g.shape[1], rows.shape[1]), dtype=np.float32) for gen in generator])
    z = np.sort(z, axis=1)
    rank = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1, stable=True)
    sorted_z = torch.from_numpy(z).to(device=g.device, dtype=g.dtype)
    return torch.gather(sorted_z, 1, rank).reshape(g.shape)


def x0_estimate(model: EpsModel, x_t: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The one-step estimate (x_t - sqrt(1 - abar) eps_theta(x_t, t)) / sqrt(abar), unclamped."""
    a = _rows(abar, x_t)
    return (x_t - (1 - a).sqrt() * model(x_t, t)) / a.sqrt()


def _mixed_xt(x0, abar, eps, delta, lam):
    a, lam = _rows(abar, x0), _rows(lam, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * ((1 - lam * lam).sqrt() * eps + lam * delta)


def _iteration_noise(eps: Sequence[torch.Tensor] | torch.Tensor, x0: torch.Tensor, what: str) -> list[torch.Tensor]:
    noise = list(eps)
    if not noise:
        raise ValueError(f"{what}: no iteration noise given (eps must hold one [B, C, H, W] tensor per iteration)")
    for i, e in enumerate(noise):
        if e.shape != x0.shape:
            raise ValueError(f"{what}: eps[{i}] has shape {tuple(e.shape)}, expected one tensor of the images' shape "
                             f"{tuple(x0.shape)} per iteration (a [iterations, B, C, H, W] tensor or a list)")
    return noise


def cgpo(model: EpsModel, classifier: Logits, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
         abar: torch.Tensor, eps: Sequence[torch.Tensor] | torch.Tensor, delta0: torch.Tensor,
         generator: np.random.Generator | Sequence[np.random.Generator]) -> torch.Tensor:
    """Classifier-guided perturbation optimisation: the adversarial, Gaussian-marginal delta.

    One iteration per tensor of ``eps`` (ADDT: 5). Iteration i mixes its own noise,
    x_t = sqrt(abar) x0 + sqrt(1 - abar) (sqrt(1 - lambda^2) eps_i + lambda delta), adds
    d CE(f(x0_hat / 2 + 0.5), y) / d delta to the running sum g, and sets delta = RBGM(g). A fresh
    eps_i per iteration is the reference loop (LYMDLUT/ADDT ``train_ADDT.py`` draws its noise
    inside the loop), so g sums the gradient over 5 noise draws.

    Args:
        model: eps_theta (the model being trained; its mode is the caller's: train, as ADDT).
        classifier: the frozen classifier on [0, 1] images.
        x0: ``[B, C, H, W]`` clean images in [-1, 1]; y: ``[B]`` labels; t: ``[B]`` timesteps;
            abar: ``[B]`` abar_t.
        eps: the N(0, I) mixing noise, one ``[B, C, H, W]`` tensor per iteration (a list, or a
            tensor ``[iterations, B, C, H, W]``).
        delta0: ``[B, C, H, W]`` N(0, I), the initial delta.
        generator: RBGM's draws (one generator, or one per image: :func:`rbgm`), C rows per image
            and iteration.

    Returns:
        delta ``[B, C, H, W]`` (no graph): RBGM of the accumulated gradient.
    """
    noise = _iteration_noise(eps, x0, "cgpo")
    lam = addt_lambda(abar)
    delta, g = delta0.detach(), torch.zeros_like(x0)
    for eps_i in noise:
        d = delta.clone().requires_grad_(True)
        x0_hat = x0_estimate(model, _mixed_xt(x0, abar, eps_i, d, lam), t, abar)
        loss = F.cross_entropy(classifier(x0_hat / 2 + 0.5), y)
        (grad,) = torch.autograd.grad(loss, d)  # w.r.t. delta only: no parameter .grad is touched
        g = g + grad  # accumulated, never reset
        delta = rbgm(g, generator)
    return delta.detach()


def addt_loss(model: EpsModel, x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, delta: torch.Tensor,
              eps_prime: torch.Tensor) -> torch.Tensor:
    """MSE(eps_theta(x_t, t), sqrt(1 - lambda^2) eps' + lambda delta), x_t built with that noise."""
    lam = addt_lambda(abar)
    target = (1 - _rows(lam, x0) ** 2).sqrt() * eps_prime + _rows(lam, x0) * delta
    x_t = _rows(abar, x0).sqrt() * x0 + (1 - _rows(abar, x0)).sqrt() * target
    return F.mse_loss(model(x_t, t), target)


def linf_perturbation(model: EpsModel, classifier: Logits, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                      abar: torch.Tensor, eps: Sequence[torch.Tensor] | torch.Tensor, *, radius: float = 8 / 255,
                      step: float = 4 / 255) -> torch.Tensor:
    """The L_inf variant's delta ``[B, C, H, W]`` in [0, 1] pixel units (no graph).

    delta starts at 0; one signed-gradient step per tensor of ``eps`` (ADDT: 5): the model sees
    x_t = sqrt(abar) x0 + sqrt(1 - abar) (eps_i + r_t 2 delta) with that step's own noise eps_i
    (2 delta: the perturbation in the model's [-1, 1] units; the reference ``train_ADDT_linf.py``
    draws its noise inside the loop too), the cross-entropy's gradient is taken afresh (reset
    every step), delta moves by ``step * sign``, is clipped to [-radius, radius] and keeps
    x0 + delta a valid image.
    """
    noise = _iteration_noise(eps, x0, "linf_perturbation")
    r = _rows(linf_ratio(abar), x0)
    a = _rows(abar, x0)
    x01 = x0 / 2 + 0.5
    delta = torch.zeros_like(x0)
    for eps_i in noise:
        d = delta.clone().requires_grad_(True)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * (eps_i + r * 2 * d)
        loss = F.cross_entropy(classifier(x0_estimate(model, x_t, t, abar) / 2 + 0.5), y)
        (grad,) = torch.autograd.grad(loss, d)
        delta = (delta + step * grad.sign()).clamp(-radius, radius)
        delta = (x01 + delta).clamp(0, 1) - x01
    return delta.detach()


def linf_loss(model: EpsModel, x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, delta: torch.Tensor,
              eps_prime: torch.Tensor) -> torch.Tensor:
    """MSE(eps_theta(x_t, t), eps' + r_t 2 delta), x_t = sqrt(abar) x0 + sqrt(1 - abar) (eps' + r_t 2 delta)."""
    target = eps_prime + _rows(linf_ratio(abar), x0) * 2 * delta
    x_t = _rows(abar, x0).sqrt() * x0 + (1 - _rows(abar, x0)).sqrt() * target
    return F.mse_loss(model(x_t, t), target)


def ema_decay(step: int) -> float:
    """The EMA decay with warm-up at optimisation step ``step`` (0-based): min(0.9999, 1 - (1 + step)^-0.75)."""
    return min(0.9999, 1.0 - (1.0 + step) ** -0.75)
