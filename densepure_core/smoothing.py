"""The smoothed base classifier: noisy copies -> K purifications -> classify -> majority vote.

For an image x in [0, 1] and copy index j, the noisy copy is x + sigma * e_j with e_j drawn from
the generator seeded by (run seed, image id, j, SMOOTH). The base classifier's label for that
copy is the majority of K votes; vote k purifies the same noisy copy with reverse-process noise
seeded by (run seed, image id, j, k, REVERSE) and classifies the result. Ties go to the label
that appeared first (the earliest vote). With K = 1 and the ``none`` purifier this is Cohen
et al.'s f(x + e); with the one-shot purifier it is Carlini et al.'s DDS.

Batching: up to ``batch_size`` copies are "open" at once; each batch holds the next vote of
every open copy, and a copy closes when its label is decided, making room for the next copy.
Batches stay full until the last copies, and a row's result depends only on its ids, never on
the batch it lands in.

Exact early exit: after m of K votes, the leader L cannot be overtaken when every other label
y has count[y] + (K - m) < count[L], or equality with L first seen before y. Then the
remaining votes are skipped; the label is the one all K votes would give.

Example:
    >>> sbc = SmoothedBaseClassifier(classifier, purifier, sigma=0.5, votes=10, num_classes=10)
    >>> counts0, counts, stats = sbc.selection_and_estimation(x, "img-0", n0=100, n=1000)
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .rng import REVERSE, SMOOTH, RowNoise, derive_seed, gaussian_rows

__all__ = ["VoteStats", "SmoothedBaseClassifier", "NonFiniteOutputError", "majority_decided"]

_UNSEEN = np.iinfo(np.int64).max


class NonFiniteOutputError(FloatingPointError):
    """A model produced NaN or Inf; the message names the image and the model."""


@dataclass
class VoteStats:
    """Work done for one image: UNet and classifier calls (one per image row, padding excluded)."""

    unet_calls: int = 0
    classifier_calls: int = 0
    votes_skipped: int = 0  # votes saved by exact early exit
    batches: int = 0

    def add(self, other: "VoteStats") -> None:
        self.unet_calls += other.unet_calls
        self.classifier_calls += other.classifier_calls
        self.votes_skipped += other.votes_skipped
        self.batches += other.batches


def majority_decided(counts: np.ndarray, first: np.ndarray, done: np.ndarray, votes: int,
                     early_exit: bool) -> tuple[np.ndarray, np.ndarray]:
    """Leader and whether it is final, for each copy.

    Args:
        counts: int64 [M, C] votes per label so far.
        first: int64 [M, C] index of the first vote for each label (``_UNSEEN`` if none).
        done: int64 [M] votes cast so far.
        votes: K.
        early_exit: if False, a copy is decided only after all K votes.

    Returns:
        (leader [M] int64, decided [M] bool). The leader is the label with the most votes,
        ties to the earliest first vote. ``decided`` is True iff no continuation of the
        remaining K - done votes can change the leader.
    """
    m = counts.shape[0]
    rows = np.arange(m)
    # Order labels by (count desc, first asc): key = count * BIG - first.
    big = votes + 1
    key = counts * big - np.minimum(first, big - 1)
    leader = key.argmax(axis=1)
    remaining = votes - done
    decided = remaining == 0
    if early_exit:
        lead_count = counts[rows, leader]
        lead_first = first[rows, leader]
        reach = counts + remaining[:, None]
        # y can still win if it can exceed L, or tie L while having been seen before L.
        can_win = (reach > lead_count[:, None]) | ((reach == lead_count[:, None]) & (first < lead_first[:, None]))
        can_win[rows, leader] = False
        decided |= ~can_win.any(axis=1)
    return leader, decided


@dataclass
class _OpenCopies:
    """State of the copies currently being voted on."""

    index: list[int] = field(default_factory=list)  # copy index j
    noisy: list[torch.Tensor] = field(default_factory=list)  # x + sigma e_j, [C,H,W], on device
    counts: list[np.ndarray] = field(default_factory=list)
    first: list[np.ndarray] = field(default_factory=list)
    done: list[int] = field(default_factory=list)


class SmoothedBaseClassifier:
    """Vote counts of the purified-and-classified base classifier over Gaussian copies.

    Args:
        classifier: module mapping images in [0,1] ``[B,C,H,W]`` to logits ``[B, num_classes]``.
        purifier: ``purifier(x_noisy01 [B,C,H,W], noise: RowNoise | None) -> [B,C,H,W]`` with
            attributes ``stochastic`` (bool) and ``unet_calls_per_purification`` (int), as made
            by :func:`densepure_core.purify.make_purifier`.
        sigma: smoothing noise level in [0,1] pixel units.
        votes: K purifications per noisy copy (majority vote).
        num_classes: length of the count vectors.
        batch_size: image rows per model call.
        early_exit: skip votes that cannot change a copy's label (exact).
        run_seed: the run's seed.
        pad_batches: pad every batch to ``batch_size`` rows (static shapes for compiled/graphed
            GPU models); padding rows are computed and discarded, never counted.
        precision: "fp32", "bf16" or "fp16" (autocast on the device).
        model_name: a name for error messages.
    """

    def __init__(self, classifier, purifier, sigma: float, *, votes: int = 1, num_classes: int,
                 batch_size: int = 256, early_exit: bool = True, run_seed: int = 0,
                 pad_batches: bool = False, precision: str = "fp32", device: torch.device | str | None = None,
                 model_name: str = "model"):
        if votes < 1:
            raise ValueError(f"votes must be >= 1 (got {votes})")
        if votes > 1 and not getattr(purifier, "stochastic", False):
            raise ValueError("votes > 1 needs a stochastic purifier (densepure or full); "
                             "other purifiers give the same label every vote")
        self.classifier = classifier
        self.purifier = purifier
        self.sigma = float(sigma)
        self.votes = int(votes)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.early_exit = bool(early_exit)
        self.run_seed = int(run_seed)
        self.pad_batches = bool(pad_batches)
        self.precision = precision
        self.model_name = model_name
        if device is None:
            try:
                device = next(classifier.parameters()).device
            except (AttributeError, StopIteration):
                device = torch.device("cpu")
        self.device = torch.device(device)

    # -- public ---------------------------------------------------------------------------
    def labels(self, x01: torch.Tensor, image_id: str, copies: range | list[int],
               stats: VoteStats | None = None) -> np.ndarray:
        """The base classifier's label for each copy index in ``copies`` (int64 [len(copies)])."""
        copies = list(copies)
        position = {j: i for i, j in enumerate(copies)}
        out = np.full(len(copies), -1, dtype=np.int64)
        stats = stats if stats is not None else VoteStats()
        for j, label in self._stream(x01, image_id, copies, stats):
            out[position[j]] = label
        return out

    def counts(self, x01: torch.Tensor, image_id: str, copies: range | list[int],
               stats: VoteStats | None = None) -> np.ndarray:
        """Per-class counts (int64 [num_classes]) of the base classifier over ``copies``."""
        labels = self.labels(x01, image_id, copies, stats)
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)

    def selection_and_estimation(self, x01: torch.Tensor, image_id: str, n0: int, n: int
                                 ) -> tuple[np.ndarray, np.ndarray, VoteStats]:
        """CERTIFY's two count vectors: copies 0..n0-1 (selection) and n0..n0+n-1 (estimation).

        Both sets stream through the same batches, so small images keep the device busy.
        Returns (counts0 [C], counts [C], stats).
        """
        stats = VoteStats()
        labels = self.labels(x01, image_id, range(n0 + n), stats)
        counts0 = np.bincount(labels[:n0], minlength=self.num_classes).astype(np.int64)
        counts = np.bincount(labels[n0:], minlength=self.num_classes).astype(np.int64)
        return counts0, counts, stats

    # -- internals ------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _noisy_copies(self, x01: torch.Tensor, image_id: str, js: list[int]) -> torch.Tensor:
        seeds = [derive_seed(self.run_seed, image_id, j, -1, SMOOTH) for j in js]
        eps = gaussian_rows(seeds, tuple(x01.shape), device=self.device, dtype=x01.dtype)
        return x01.unsqueeze(0) + self.sigma * eps

    def _stream(self, x01: torch.Tensor, image_id: str, copies: list[int], stats: VoteStats):
        """Yield (copy index, label) as copies get decided."""
        x01 = x01.to(self.device, torch.float32)
        pending = deque(copies)
        open_ = _OpenCopies()
        k_votes, c = self.votes, self.num_classes
        while pending or open_.index:
            # Open new copies up to the batch size; their smoothing noise is drawn once.
            new = []
            while pending and len(open_.index) + len(new) < self.batch_size:
                new.append(pending.popleft())
            if new:
                noisy = self._noisy_copies(x01, image_id, new)
                for i, j in enumerate(new):
                    open_.index.append(j)
                    open_.noisy.append(noisy[i])
                    open_.counts.append(np.zeros(c, dtype=np.int64))
                    open_.first.append(np.full(c, _UNSEEN, dtype=np.int64))
                    open_.done.append(0)
            rows = len(open_.index)
            batch = torch.stack(open_.noisy)
            vote_ids = list(open_.done)
            labels = self._classify_purified(batch, image_id, open_.index, vote_ids, stats)
            stats.batches += 1
            counts = np.stack(open_.counts)
            first = np.stack(open_.first)
            r = np.arange(rows)
            counts[r, labels] += 1
            first[r, labels] = np.minimum(first[r, labels], np.asarray(vote_ids))
            done = np.asarray(vote_ids, dtype=np.int64) + 1
            leader, decided = majority_decided(counts, first, done, k_votes, self.early_exit)
            keep = []
            for i in range(rows):
                if decided[i]:
                    stats.votes_skipped += k_votes - int(done[i])
                    yield open_.index[i], int(leader[i])
                else:
                    keep.append(i)
            open_ = _OpenCopies(
                index=[open_.index[i] for i in keep], noisy=[open_.noisy[i] for i in keep],
                counts=[counts[i] for i in keep], first=[first[i] for i in keep],
                done=[int(done[i]) for i in keep],
            )

    @torch.no_grad()
    def _classify_purified(self, noisy: torch.Tensor, image_id: str, js: list[int], ks: list[int],
                           stats: VoteStats) -> np.ndarray:
        rows = noisy.shape[0]
        pad = self.batch_size - rows if self.pad_batches else 0
        if pad > 0:
            noisy = torch.cat([noisy, noisy.new_zeros((pad, *noisy.shape[1:]))])
        noise = None
        if getattr(self.purifier, "stochastic", False):
            seeds: list[int | None] = [derive_seed(self.run_seed, image_id, j, k, REVERSE)
                                       for j, k in zip(js, ks)]
            noise = RowNoise(seeds + [None] * pad, tuple(noisy.shape[1:]), device=self.device,
                             dtype=noisy.dtype)
        with self._autocast():
            purified = self.purifier(noisy, noise)
            logits = self.classifier(purified.clamp(0.0, 1.0))
        logits = logits[:rows].float()
        if not torch.isfinite(logits).all():
            raise NonFiniteOutputError(
                f"image {image_id!r}: {self.model_name} produced NaN/Inf logits "
                f"(copies {js[0]}..{js[-1]}); check the checkpoint and the precision setting "
                f"(try precision: fp32)")
        stats.unet_calls += rows * int(getattr(self.purifier, "unet_calls_per_purification", 0))
        stats.classifier_calls += rows
        return logits.argmax(dim=1).cpu().numpy().astype(np.int64)
