"""PGD with expectation over transformation (EOT) against a :class:`~densepure_core.attack.defense.Defense`.

Three attacks, one loop (:func:`run_attack`):

- ``pgd_eot``: exact gradients through every reverse step (checkpointed), each iteration's
  gradient summed over ``eot`` fresh purifications (times the defense's K votes): the
  protocol of Lee & Kim and DiffBreak (reference.md section 4).
- ``dwbox``: deterministic white-box: the forward noise and every reverse-step noise of an image
  are fixed (stream ``fixed``) and used at every iteration (EOT = 1), so the purifier is a known
  deterministic function; the final example is scored under the same noise.
- ``bpda``: the identity as the purifier's gradient (Athalye et al.), EOT as ``pgd_eot``: the
  weak baseline that overstated purification defenses.

The loop is torchattacks' ``EOTPGD`` / ``PGDL2`` (cross-entropy on the true label, gradients
summed over EOT samples, one ascent move and projection per iteration, last iterate; an
``on_iterate`` hook sees every iterate, for DiffBreak's any-iterate scoring), with every
random draw keyed by (run seed, image id, purpose, sample, vote): an image's adversarial example
does not depend on the batch it is in, the shard layout or the worker, up to the models'
batch-size-dependent float rounding (``tests/densepure_core/attack/test_pgd.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from densepure_core.rng import row_generator

from .defense import Defense, Gradient, attack_seed, purification_noise
from .threat import ThreatModel

__all__ = ["AttackKind", "ATTACK_KINDS", "AttackSpec", "AttackStats", "run_attack", "eot_samples"]

AttackKind = Literal["pgd_eot", "dwbox", "bpda"]
ATTACK_KINDS = ("pgd_eot", "dwbox", "bpda")
_GRADIENT: dict[str, Gradient] = {"pgd_eot": "exact", "dwbox": "exact", "bpda": "bpda"}


@dataclass(frozen=True)
class AttackSpec:
    """One attack's settings.

    Attributes:
        kind: ``pgd_eot``, ``dwbox`` or ``bpda``.
        iterations: PGD iterations.
        eot: purifications whose gradients are summed per iteration (``dwbox``: 1).
        step_size: the ascent step (None: ``ThreatModel.default_step_size``).
        random_start: start from a uniform point of the ball (torchattacks' ``random_start``,
            DiffBreak; the default, as in the attack config); False starts at the clean image
            (Lee & Kim, ADDT).
        gradient: ``"exact"`` (checkpointed) or ``"autograd"`` (plain, keeps every step's
            activations) for ``pgd_eot``/``dwbox``; ``bpda`` always uses the identity.
    """

    kind: AttackKind
    iterations: int = 20
    eot: int = 10
    step_size: float | None = None
    random_start: bool = True
    gradient: Literal["exact", "autograd"] = "exact"

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"attack kind {self.kind!r}: expected one of {ATTACK_KINDS}")
        if self.iterations < 1 or self.eot < 1:
            raise ValueError(f"iterations and eot must be >= 1 (got {self.iterations}, {self.eot})")
        if self.kind == "dwbox" and self.eot != 1:
            raise ValueError("a deterministic white-box attack fixes the noise: eot must be 1")

    @property
    def gradient_mode(self) -> Gradient:
        return "bpda" if self.kind == "bpda" else self.gradient


@dataclass
class AttackStats:
    """Per-image cost of one attack (every image of a batch pays the same)."""

    iterations: int = 0
    gradient_calls: int = 0  # purified-and-classified copies back-propagated, per image
    unet_calls: int = 0  # denoiser evaluations per image, recomputation included
    seconds: float = 0.0  # wall time of the batch, divided by its images


def eot_samples(defense: Defense, spec: AttackSpec) -> int:
    """Purifications per image and iteration: eot x K for a random defense, K for fixed noise,
    1 for the bare classifier (deterministic: EOT changes nothing)."""
    if not defense.purifies:
        return 1
    return defense.votes * (1 if spec.kind == "dwbox" else spec.eot)


def _purpose(spec: AttackSpec, iteration: int) -> str:
    return "fixed" if spec.kind == "dwbox" else f"eot{iteration}"


def _row_noise(defense: Defense, image_ids: Sequence[str], run_seed: int, purpose: str,
               samples: int, shape: Sequence[int], device) -> list[torch.Tensor]:
    """The noise of ``len(image_ids) * samples`` rows, image-major; sample s of an image is EOT
    (or scoring) sample s // K, vote s % K."""
    k = defense.votes
    seeds = [attack_seed(run_seed, iid, purpose, s // k, s % k) for iid in image_ids for s in range(samples)]
    return purification_noise(seeds, shape, defense.noise_draws, device=device)


def _gradient(defense: Defense, x_adv: torch.Tensor, y: torch.Tensor, image_ids: Sequence[str],
              spec: AttackSpec, iteration: int, run_seed: int, max_rows: int) -> torch.Tensor:
    """d/dx of the summed cross-entropy over the EOT purifications of each image: ``[B, ...]``.

    Rows (image x sample) go through the defense ``max_rows`` at a time; each row's noise comes
    from its own stream, so the chunking changes nothing but float summation order.
    """
    b = x_adv.shape[0]
    samples = eot_samples(defense, spec)
    purpose = _purpose(spec, iteration)
    mode = spec.gradient_mode if defense.purifies else "autograd"
    leaf = x_adv.detach().requires_grad_(True)
    per_chunk = max(1, max_rows // samples)  # whole images per chunk
    for lo in range(0, b, per_chunk):
        hi = min(b, lo + per_chunk)
        noise = _row_noise(defense, image_ids[lo:hi], run_seed, purpose, samples, x_adv.shape[1:], x_adv.device) \
            if defense.purifies else []
        rows = leaf[lo:hi].repeat_interleave(samples, dim=0)
        logits = defense.logits(rows, noise, gradient=mode)
        loss = F.cross_entropy(logits, y[lo:hi].repeat_interleave(samples), reduction="sum")
        loss.backward()
    return leaf.grad.detach()


def _start(x: torch.Tensor, image_ids: Sequence[str], threat: ThreatModel, run_seed: int) -> torch.Tensor:
    uniform = np.empty(tuple(x.shape), np.float32)
    normal = np.empty(tuple(x.shape), np.float32)
    for i, iid in enumerate(image_ids):
        g = row_generator(attack_seed(run_seed, iid, "start", 0, 0))
        uniform[i] = g.random(x.shape[1:], dtype=np.float32)
        normal[i] = g.standard_normal(x.shape[1:], dtype=np.float32)
    as_t = lambda a: torch.from_numpy(a).to(device=x.device, dtype=x.dtype)  # noqa: E731
    return threat.random_start(x, as_t(uniform), as_t(normal))


def run_attack(defense: Defense, x: torch.Tensor, y: torch.Tensor, image_ids: Sequence[str],
               threat: ThreatModel, spec: AttackSpec, *, run_seed: int, max_rows: int = 256,
               on_iterate: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, AttackStats]:
    """Attack a batch of images; returns the last iterate and its per-image cost.

    Args:
        defense: what to attack.
        x: ``[B, C, H, W]`` clean images in [0, 1].
        y: ``[B]`` true labels (long).
        image_ids: ``B`` stable ids (key every random draw).
        threat: the ball.
        spec: the attack.
        run_seed: the run's seed.
        max_rows: purified rows per forward/backward pass (memory, not results).
        on_iterate: called as ``on_iterate(i, x_i)`` after PGD iteration i = 1..iterations with the
            iterate ``[B, C, H, W]`` (no graph); e.g. :class:`~densepure_core.attack.scoring.IterateCheck`.
            Its cost is not in the returned stats.

    Returns:
        ``(x_adv [B, C, H, W], stats)``: x_adv in [0, 1] and within ``threat`` of x.
    """
    if len(image_ids) != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images, {y.shape[0]} labels, {len(image_ids)} ids")
    start = time.perf_counter()
    step = spec.step_size if spec.step_size is not None else threat.default_step_size()
    x = x.detach()
    x_adv = _start(x, image_ids, threat, run_seed) if spec.random_start else x.clone()
    for it in range(spec.iterations):
        grad = _gradient(defense, x_adv, y, image_ids, spec, it, run_seed, max_rows)
        x_adv = threat.project(threat.ascend(x_adv, grad, step), x).detach()
        if on_iterate is not None:
            on_iterate(it + 1, x_adv)
    samples = eot_samples(defense, spec)
    # exact: a forward pass, then one recomputation per step in the backward pass
    per_purification = defense.unet_calls * (2 if spec.gradient_mode == "exact" else 1)
    stats = AttackStats(iterations=spec.iterations, gradient_calls=spec.iterations * samples,
                        unet_calls=spec.iterations * samples * per_purification,
                        seconds=(time.perf_counter() - start) / max(1, x.shape[0]))
    return x_adv, stats
