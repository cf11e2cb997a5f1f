"""Scoring an (adversarial) example over several purifications: mean, majority, worst case.

A purifying defense is random, so "is x_adv misclassified" has no single answer. Following
DiffBreak and Lee & Kim (reference.md section 4), an example is classified by M fresh
purifications (each itself a K-vote majority for a DensePure-style defense), and scored as:

- ``mean``: the fraction of the M predictions that are correct (the expected accuracy of one
  purification);
- ``majority``: whether the majority of the M predictions (ties to the earliest) is correct;
- ``worst``: whether all M are correct (wrong if any purification is wrong: the attacker wins
  with one lucky draw).

For the bare classifier every purification is the same, and so are the three rules. Under a
deterministic white-box attack the example is scored under the attack's own fixed noise (one
purification), as the protocol says.

These rules score the *last iterate* only. DiffBreak's evaluation (andrekassis/DiffBreak,
``attacks/pgd.py`` with ``ClassifierWrapper.eval_attack``) checks every PGD iterate against its
own fresh purifications (32 by default) and counts the image as broken if any iterate succeeds:
:class:`IterateCheck` records, per image, the first checked point where the majority of M' fresh
purifications is wrong and the first where any one is wrong (point 0: the clean image, as
DiffBreak's initial check; point i: after PGD iteration i). That protocol is never weaker than
the last-iterate rule with the same M'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .defense import Defense, attack_seed, majority_labels, purification_noise

__all__ = ["RULES", "NEVER", "Scores", "predict", "score", "IterateCheck"]

RULES = ("mean", "majority", "worst")
#: ``IterateCheck.broken_at`` of an image no checked point broke.
NEVER = -1


@dataclass(frozen=True)
class Scores:
    """Predictions and rule outcomes of B images.

    Attributes:
        predictions: int64 ``[B, M]``: the defense's label under each scoring purification.
        mean: float64 ``[B]``: fraction correct.
        majority: bool ``[B]``: the majority prediction is correct.
        worst: bool ``[B]``: every prediction is correct.
    """

    predictions: np.ndarray
    mean: np.ndarray
    majority: np.ndarray
    worst: np.ndarray


def predict(defense: Defense, x: torch.Tensor, image_ids: Sequence[str], *, run_seed: int, purpose: str,
            purifications: int, max_rows: int = 256) -> np.ndarray:
    """The defense's predictions ``[B, M]`` of x under M purifications keyed by ``purpose``.

    Each prediction is the majority of the defense's K votes (vote k of purification m uses
    the stream (purpose, sample m, vote k)). Without purification M is 1.
    """
    b = x.shape[0]
    m = purifications if defense.purifies else 1
    k = defense.votes
    samples = m * k
    labels = np.empty((b, samples), np.int64)
    per_chunk = max(1, max_rows // samples)
    for lo in range(0, b, per_chunk):
        hi = min(b, lo + per_chunk)
        noise = []
        if defense.purifies:
            seeds = [attack_seed(run_seed, iid, purpose, s // k, s % k) for iid in image_ids[lo:hi]
                     for s in range(samples)]
            noise = purification_noise(seeds, x.shape[1:], defense.noise_draws, device=x.device)
        rows = x[lo:hi].detach().repeat_interleave(samples, dim=0)
        logits = defense.logits(rows, noise, gradient="none")
        labels[lo:hi] = logits.argmax(dim=1).view(hi - lo, samples).cpu().numpy()
    return majority_labels(labels.reshape(b, m, k), defense.num_classes)


def score(predictions: np.ndarray, labels: np.ndarray | Sequence[int], num_classes: int) -> Scores:
    """The three rules from predictions ``[B, M]`` and true labels ``[B]``."""
    preds = np.asarray(predictions, np.int64)
    y = np.asarray(labels, np.int64).reshape(-1, 1)
    correct = preds == y
    return Scores(predictions=preds, mean=correct.mean(axis=1),
                  majority=majority_labels(preds, num_classes) == y[:, 0], worst=correct.all(axis=1))


class IterateCheck:
    """DiffBreak's any-iterate protocol: checks points of an attack's trajectory against fresh
    purifications and keeps, per image, the first point that broke it.

    Call it with point 0 (the clean image) and pass it as ``run_attack(on_iterate=...)`` for
    points 1..N. Point i is predicted by M' purifications keyed ``check<i>`` (sample m, vote k),
    fresh per point and independent of the scoring purifications; with ``fixed`` (a
    deterministic white-box attack) by the attack's own fixed noise, M' = 1. An image already
    broken under the majority rule (so under the worst case too) is not checked again.

    Attributes:
        purifications: M' as run (1 without purification or with fixed noise).
        broken_at_majority, broken_at_worst: int64 ``[B]``: the first point where the majority
            label / any one of the M' predictions was wrong; :data:`NEVER` if none.
        checks: purified-and-classified copies per image so far (each a K-vote majority).
    """

    def __init__(self, defense: Defense, labels: np.ndarray | Sequence[int], image_ids: Sequence[str], *,
                 run_seed: int, purifications: int = 32, fixed: bool = False, max_rows: int = 256):
        if purifications < 1:
            raise ValueError(f"IterateCheck: purifications must be >= 1 (DiffBreak: 32), got {purifications}")
        self.defense, self.image_ids, self.run_seed, self.fixed, self.max_rows = \
            defense, list(image_ids), run_seed, fixed and defense.purifies, max_rows
        self.labels = np.asarray(labels, np.int64)
        self.purifications = 1 if (self.fixed or not defense.purifies) else int(purifications)
        b = len(self.image_ids)
        self.broken_at_majority = np.full(b, NEVER, np.int64)
        self.broken_at_worst = np.full(b, NEVER, np.int64)
        self.checks = np.zeros(b, np.int64)

    def __call__(self, point: int, x: torch.Tensor) -> None:
        """Check point ``point`` of the trajectory: ``x`` ``[B, C, H, W]`` in [0, 1]."""
        todo = np.flatnonzero(self.broken_at_majority == NEVER)
        if todo.size == 0:
            return
        purpose = "fixed" if self.fixed else f"check{point}"
        preds = predict(self.defense, x[torch.as_tensor(todo, device=x.device)], [self.image_ids[i] for i in todo],
                        run_seed=self.run_seed, purpose=purpose, purifications=self.purifications,
                        max_rows=self.max_rows)
        s = score(preds, self.labels[todo], self.defense.num_classes)
        self.checks[todo] += preds.shape[1]
        for broken_at, ok in ((self.broken_at_majority, s.majority), (self.broken_at_worst, s.worst)):
            newly = todo[(broken_at[todo] == NEVER) & ~ok]
            broken_at[newly] = point
