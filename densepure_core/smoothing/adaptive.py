"""Adaptive sampling in the engine: which copies an image needs next, from its labels so far.

The rule and the bounds are :mod:`densepure_core.certification.sequential`'s (``StoppingRule.evaluate``); this module only maps an engine job's labels
(copies 0..n0-1: selection; n0..: estimation, in copy order) onto them. An image starts with
its n0 selection copies and the estimation copies up to the first look; when every copy up to
a look is decided, :meth:`AdaptivePlan.next_copies` consults the rule and either stops the image
or returns the copies up to the next look. Copy j is always copy j (its noise is keyed by j),
so an adaptive run's first m estimation copies are a fixed run's first m, and with ``stop``
off (one look at n_max) the counts are fixed CERTIFY's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from densepure_core.certification import sequential

__all__ = ["AdaptivePlan", "AdaptiveState"]


@dataclass
class AdaptiveState:
    """Where one image's adaptive estimation stands (kept on its ``ImageJob``)."""

    n_used: int = 0
    n_a: int = 0
    lower: float = 0.0
    upper: float = 1.0
    stop_reason: str = ""
    looks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class AdaptivePlan:
    """The adaptive sampling of one partition (one sigma).

    Attributes:
        n0: selection copies.
        n_max: the most estimation copies.
        alpha, radii: the stopping rule's alpha and radius grid (they steer where an image
            stops; the certificate is re-computed from the stored fields at any alpha).
        sigma: the partition's noise level.
        bound: one of ``sequential.BOUNDS``.
        params: the bound's parameters (stored with the votes as ``bound_params``).
        schedule: the looks (estimation copies) at which the rule is consulted; ends at n_max.
        stop: False: no stopping (exactly n_max copies, one look).
        futility: the futility threshold of the rule (0: none); it steers the stop only.
    """

    n0: int
    n_max: int
    alpha: float
    sigma: float
    radii: tuple[float, ...]
    bound: str
    params: dict[str, Any]
    schedule: tuple[int, ...]
    stop: bool = True
    futility: float = 0.0

    def __post_init__(self) -> None:
        if not self.schedule or self.schedule[-1] != self.n_max:
            raise ValueError(f"the schedule must end at n_max = {self.n_max}, got {self.schedule}")
        if not self.stop and tuple(self.schedule) != (self.n_max,):
            raise ValueError("stop=False draws n_max copies: the schedule must be (n_max,)")
        self.rule  # validates the bound, its parameters and the looks once

    @cached_property
    def rule(self) -> sequential.StoppingRule:
        """The stopping rule (its count tables are built on the first look)."""
        return sequential.StoppingRule(self.alpha, self.sigma, tuple(self.radii), self.n_max, tuple(self.schedule),
                                       self.bound, dict(self.params), float(self.futility), self.stop)

    @classmethod
    def from_config(cls, cfg: Any, sigma: float) -> "AdaptivePlan":
        """The plan of a ``CertifyConfig`` with ``sampling: adaptive`` at ``sigma``."""
        ada, n_max = cfg.adaptive, cfg.budget
        return cls(n0=cfg.n0, n_max=n_max, alpha=cfg.stop_alpha(), sigma=float(sigma),
                   radii=tuple(cfg.stop_radii()), bound=ada.bound, params=ada.bound_params(n_max),
                   schedule=tuple(ada.schedule(n_max)), stop=ada.stop, futility=float(ada.futility))

    def first_copies(self) -> range:
        """The copies an image opens with: selection plus estimation up to the first look."""
        return range(self.n0 + self.schedule[0])

    def next_copies(self, labels: np.ndarray, state: AdaptiveState) -> range:
        """Consult the rule on the decided ``labels`` (all copies so far, in copy order).

        Updates ``state``; returns the copies up to the next look, or an empty range when the
        image stops.
        """
        n = labels.size - self.n0
        c_a = int(np.argmax(np.bincount(labels[:self.n0])))  # ties to the lowest class
        n_a = int(np.count_nonzero(labels[self.n0:] == c_a))
        lower, upper, code = self.rule.evaluate(n_a, n)
        state.n_used, state.n_a, state.lower, state.upper = n, n_a, lower, upper
        state.looks.append(n)
        if code:
            state.stop_reason = sequential.STOP_REASONS[code]
            return range(0)
        nxt = next(m for m in self.schedule if m > n)
        return range(self.n0 + n, self.n0 + nxt)

