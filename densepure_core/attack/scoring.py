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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .defense import Defense, attack_seed, majority_labels, purification_noise

__all__ = ["RULES", "Scores", "predict", "score"]

RULES = ("mean", "majority", "worst")


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
