"""The defenses an attack evaluation attacks: classifier, or purifier then classifier.

A :class:`Defense` maps images x in [0, 1] to logits through

- ``none``: the bare classifier;
- ``purify``: diffuse x to t* in one forward step, x_t* = sqrt(abar) (2x - 1) + sqrt(1 - abar) eps
  (DiffPure's forward marginal, eps ~ N(0, I)), run the reverse process over the chosen
  timesteps (``ReverseProcess``: DDPM ancestral with S steps, or one-shot), map the clipped x0
  to [0, 1] and classify; with ``votes`` K > 1, DensePure's majority label over K purifications.

Every purification draws ``1 + draws`` standard-normal tensors (the forward eps, then one per
reverse step but the last), all given by the caller (:func:`purification_noise` draws them from
per-row streams keyed by :func:`attack_seed`), so a purification is a deterministic function
of its inputs: the deterministic white-box attack fixes them, EOT draws fresh ones.

Gradients (``gradient=``):

- ``"exact"``: through every reverse step, each step wrapped in ``torch.utils.checkpoint``:
  the forward pass keeps only each step's input state and noise (one image per step), and the
  backward pass recomputes one step's denoiser graph at a time, so activation memory does not
  grow with the number of steps. Equal to plain autograd (``"autograd"``, which keeps every
  step's activations) up to float rounding: ``tests/densepure_core/attack/test_defense.py``.
- ``"bpda"``: Athalye et al.'s backward pass differentiable approximation with the identity:
  the purified image is computed without a graph and the gradient passes straight through.
- ``"none"``: no graph (scoring).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from densepure_core.diffusion.reverse import ReverseProcess
from densepure_core.rng import RowNoise, derive_seed
from densepure_core.smoothing.scheduler import UNSEEN, majority_decided

__all__ = ["Gradient", "GRADIENTS", "Defense", "attack_seed", "purification_noise", "majority_labels"]

Gradient = Literal["exact", "autograd", "bpda", "none"]
GRADIENTS = ("exact", "autograd", "bpda", "none")


def attack_seed(run_seed: int, image_id: str, purpose: str, sample: int, vote: int) -> int:
    """The 63-bit seed of one purification's noise (``rng.derive_seed``, stream ``attack:<purpose>``).

    Args:
        run_seed: the run's seed.
        image_id: the image's stable id.
        purpose: what the draw is for: ``eot<i>`` (EOT samples of PGD iteration i), ``fixed``
            (the deterministic white-box noise), ``score`` (the scoring purifications),
            ``start`` (the random start).
        sample: the EOT sample or scoring purification index.
        vote: the DensePure vote index k (0 with one vote).
    """
    return derive_seed(run_seed, image_id, sample, vote, f"attack:{purpose}")


def purification_noise(seeds: Sequence[int], shape: Sequence[int], count: int,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``count`` tensors ``[len(seeds), *shape]``: draw t of row i is the t-th draw of the
    Philox stream keyed by ``seeds[i]`` (``rng.RowNoise``), whatever the batch or its order."""
    noise = RowNoise(list(seeds), shape, device=device, dtype=dtype)
    return [noise.draw() for _ in range(count)]


def majority_labels(labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """The majority label of each row of ``labels`` ``[..., K]``, ties to the earliest vote
    (DensePure's rule, the one the certification engine counts with:
    ``smoothing.scheduler.majority_decided``). Returns int64 ``[...]``."""
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    lead_shape, k = lab.shape[:-1], lab.shape[-1]
    flat = lab.reshape(-1, k)
    m = flat.shape[0]
    counts = np.zeros((m, num_classes), np.int64)
    first = np.full((m, num_classes), UNSEEN, np.int64)
    rows = np.arange(m)
    for j in range(k - 1, -1, -1):  # backwards: the last write is the earliest vote
        counts[rows, flat[:, j]] += 1
        first[rows, flat[:, j]] = j
    leader, _ = majority_decided(counts, first, np.full(m, k, np.int64), k, early_exit=False)
    return leader.reshape(lead_shape)


@dataclass(frozen=True, eq=False)
class Defense:
    """A classifier, optionally behind a diffusion purifier with a K-vote majority.

    Attributes:
        name: the defense's name (rows and tables).
        classifier: images ``[N, C, H, W]`` in [0, 1] -> logits ``[N, classes]``.
        process: the reverse chain (None: no purification).
        t_star: the timestep x is diffused to (None: no purification).
        votes: K purifications per prediction, majority label (1: a single purification).
    """

    name: str
    classifier: torch.nn.Module
    process: ReverseProcess | None = None
    t_star: int | None = None
    votes: int = 1

    def __post_init__(self) -> None:
        if (self.process is None) != (self.t_star is None):
            raise ValueError("a purifying defense needs both a reverse process and t*")
        if self.votes < 1 or (self.process is None and self.votes != 1):
            raise ValueError(f"votes must be >= 1, and 1 without purification (got {self.votes})")

    @property
    def purifies(self) -> bool:
        """Whether the defense purifies (and so is random, unless its noise is fixed)."""
        return self.process is not None

    @property
    def noise_draws(self) -> int:
        """Standard-normal tensors per purification: the forward eps plus one per reverse step
        but the last (0 without purification)."""
        return 0 if self.process is None else 1 + self.process.draws

    @property
    def unet_calls(self) -> int:
        """Denoiser calls per purification (forward only)."""
        return 0 if self.process is None else self.process.num_steps

    @property
    def num_classes(self) -> int:
        return int(self.classifier.num_classes)

    def purify(self, x01: torch.Tensor, noise: Sequence[torch.Tensor] = (), *,
               gradient: Gradient = "none") -> torch.Tensor:
        """Purify rows of images.

        Args:
            x01: ``[N, C, H, W]`` in [0, 1].
            noise: ``noise_draws`` tensors ``[N, C, H, W]`` (forward eps first).
            gradient: see the module docstring.

        Returns:
            ``[N, C, H, W]`` in [0, 1] (x01 itself without purification).
        """
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient={gradient!r}: expected one of {GRADIENTS}")
        if self.process is None:
            return x01
        if len(noise) != self.noise_draws:
            raise ValueError(f"defense {self.name!r}: {len(noise)} noise tensors given, a purification "
                             f"draws {self.noise_draws}")
        if gradient == "bpda":
            with torch.no_grad():
                purified = self._chain(x01, noise, use_checkpoint=False)
            # Identity backward: the value of the purified image, the gradient of x01.
            return x01 + (purified - x01).detach()
        ctx = torch.no_grad() if gradient == "none" else contextlib.nullcontext()
        with ctx:
            return self._chain(x01, noise, use_checkpoint=gradient == "exact")

    def _chain(self, x01: torch.Tensor, noise: Sequence[torch.Tensor], *, use_checkpoint: bool) -> torch.Tensor:
        abar = float(self.process.schedule.alphas_cumprod[self.t_star])
        eps = noise[0].to(device=x01.device, dtype=x01.dtype)
        x = math.sqrt(abar) * (2.0 * x01 - 1.0) + math.sqrt(1.0 - abar) * eps
        x0 = x
        for i in range(self.process.num_steps):
            z = noise[1 + i] if i < self.process.draws else None
            if use_checkpoint and torch.is_grad_enabled():
                # Saves (x, z) only; the step's denoiser graph is rebuilt during backward. The
                # step is a pure function of (x, z) (the noise is a tensor, never a callable
                # that would draw again on recompute).
                x, x0 = checkpoint(self.process.step, x, i, z, use_reentrant=False)
            else:
                x, x0 = self.process.step(x, i, z)
        return (x0 + 1) / 2

    def logits(self, x01: torch.Tensor, noise: Sequence[torch.Tensor] = (), *,
               gradient: Gradient = "none") -> torch.Tensor:
        """``classifier(purify(x01, noise))``: ``[N, classes]`` float32 (no graph for ``"none"``)."""
        ctx = torch.no_grad() if gradient == "none" else contextlib.nullcontext()
        with ctx:
            return self.classifier(self.purify(x01, noise, gradient=gradient)).float()
