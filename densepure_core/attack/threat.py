"""Threat models: the L_inf and L_2 balls around an image in [0, 1], and PGD's moves inside them.

The moves are those of Madry et al.'s PGD as torchattacks writes them (``PGD``, ``EOTPGD``,
``PGDL2``; torchattacks itself is not a dependency: it pins ``requests~=2.25``, which the rest
of the stack cannot take): L_inf ascends along the gradient's sign, L_2 along the gradient
normalised per image; both then project the perturbation onto the ball and clip the image to
[0, 1]. ``tests/densepure_core/attack/test_threat.py`` pins them against a transcription of
torchattacks' loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Norm", "NORMS", "ThreatModel", "perturbation_norms"]

Norm = Literal["linf", "l2"]
NORMS = ("linf", "l2")
# torchattacks' PGDL2 guard against dividing by a zero norm.
_EPS_DIVISION = 1e-10


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm, shaped ``[B, 1, ..., 1]`` to broadcast against x ``[B, ...]``."""
    return x.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.ndim - 1)))


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_inf ``[B]``, L_2 ``[B]``) of ``x_adv - x`` per image (pixels in [0, 1])."""
    d = (x_adv - x).flatten(1)
    return d.abs().amax(dim=1), d.norm(p=2, dim=1)


@dataclass(frozen=True)
class ThreatModel:
    """A perturbation budget: ``||x_adv - x||_norm <= eps`` with x_adv in [0, 1].

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        eps: the radius, in [0, 1] pixel units (8/255 for L_inf on CIFAR-10, 0.5 for L_2).
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r}: expected one of {NORMS}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 (got {self.eps})")

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the ball around x (per image), clipped to [0, 1].

        L_inf clamps each pixel; L_2 rescales a perturbation longer than eps onto the sphere
        (torchattacks' ``factor = min(eps / ||delta||, 1)``). Clipping to [0, 1] last can only
        shorten the perturbation, so the result stays in the ball.
        """
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            factor = (self.eps / _flat_norm(delta)).clamp(max=1.0)
            delta = delta * factor
        return (x + delta).clamp(0.0, 1.0)

    def ascend(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        """One ascent move (before projection): x_adv + step * sign(grad) for L_inf, or
        x_adv + step * grad / ||grad||_2 (per image) for L_2."""
        if self.norm == "linf":
            return x_adv + step_size * grad.sign()
        return x_adv + step_size * grad / (_flat_norm(grad) + _EPS_DIVISION)

    def random_start(self, x: torch.Tensor, uniform: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """A random point of the ball, as torchattacks draws it, from given draws.

        Args:
            x: ``[B, ...]`` clean images.
            uniform: ``[B, ...]`` U(0, 1) draws (L_inf: the offset is eps (2u - 1); L_2: only
                ``uniform[:, 0, ...]``'s first element per image is used, as the radius
                fraction r ~ U(0, 1)).
            normal: ``[B, ...]`` N(0, 1) draws (L_2: the direction; unused for L_inf).

        Returns:
            ``[B, ...]`` in [0, 1]: L_inf x + U(-eps, eps), L_2 x + r eps n / ||n||, clipped.
        """
        if self.norm == "linf":
            delta = self.eps * (2.0 * uniform - 1.0)
        else:
            r = uniform.flatten(1)[:, :1].view(-1, *([1] * (x.ndim - 1)))
            delta = normal / _flat_norm(normal) * r * self.eps
        return (x + delta).clamp(0.0, 1.0)

    def default_step_size(self) -> float:
        """eps / 4 for L_inf (2/255 at 8/255) and eps / 5 for L_2 (0.1 at 0.5): the PGD-20 steps
        of ADDT's and DiffPure's evaluations (reference.md section 4)."""
        return self.eps / 4 if self.norm == "linf" else self.eps / 5
