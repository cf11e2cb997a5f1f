"""The engine's host side: slots, vote counting and exact early exit. No models, no device.

``batch_size`` rows live in one fixed device buffer (owned by a :class:`Backend`); a row is one
noisy copy, and each batch runs the next vote of every open copy (copies x votes in one batch).
A copy whose label is decided frees its slot and the next copy is opened into it, so batches
stay full; copies of the next image fill the slots the current image frees, so there is no
half-empty tail per image either. A row's result depends only on its ids (image, copy, vote),
never on the batch it lands in, so none of this changes a count.

Images whose copies come in looks (adaptive sampling, ``ImageJob.extend``): when every copy
opened so far is decided, ``extend(job)`` returns the next copies (or none: the image is done).
While an image waits for its look, the next images' copies fill the free slots, so several
images feed the slots at once (oldest first); results are still yielded in input order.

Exact early exit: after m of K votes, the leader L cannot be overtaken when every other label y
has count[y] + (K - m) < count[L], or equality with L first seen before y. The remaining votes
are skipped (``VoteStats.votes_skipped``); the label is the one all K votes would give.

Everything here is numpy bookkeeping, testable with a stub backend
(``tests/densepure_core/smoothing/test_scheduler.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["VoteStats", "ImageJob", "Backend", "RowIds", "VoteScheduler", "NonFiniteOutputError",
           "majority_decided", "UNSEEN"]

UNSEEN = np.iinfo(np.int64).max  # "no vote yet" in the first-vote table


class NonFiniteOutputError(FloatingPointError):
    """A model produced NaN or Inf; the message names the image and the model."""


@dataclass
class VoteStats:
    """Work done for one image: UNet and classifier calls (one per image row, padding excluded)."""

    unet_calls: int = 0
    classifier_calls: int = 0
    votes_skipped: int = 0  # votes saved by exact early exit
    batches: int = 0  # batches this image had rows in
    rows_padded: int = 0  # padding rows computed and discarded (fixed-shape batches)
    # This image's share of the engine's wall time: each batch's time (since the previous
    # batch, so opening copies and drawing noise count too) split over its images by rows.
    # Unlike in-flight time, these add up to the engine's total over a stream of images.
    seconds: float = 0.0

    def add(self, other: "VoteStats") -> None:
        self.unet_calls += other.unet_calls
        self.classifier_calls += other.classifier_calls
        self.votes_skipped += other.votes_skipped
        self.batches += other.batches
        self.rows_padded += other.rows_padded
        self.seconds += other.seconds


@dataclass
class ImageJob:
    """One image's copies going through the engine.

    ``image`` is opaque here (the backend's device tensor); ``shape`` is its shape (None for an
    image that failed before it started). ``labels[p]`` is the base classifier's label of copy
    ``copies[p]``, -1 until decided. ``extend`` (adaptive sampling): called when every copy in
    ``copies`` is decided; returns the next copies to vote, or an empty sequence when the image
    is done. ``info``: the caller's per-image state (opaque here).
    """

    image_id: str
    image: Any
    shape: tuple[int, ...] | None
    copies: list[int]
    labels: np.ndarray
    undecided: int
    stats: VoteStats = field(default_factory=VoteStats)
    error: BaseException | None = None
    next_pos: int = 0  # next position of ``copies`` to open
    uid: int = -1
    started: float = 0.0
    finished: float = 0.0
    extend: Callable[["ImageJob"], Sequence[int]] | None = None
    info: Any = None

    @property
    def done(self) -> bool:
        """Every copy decided and no more to come (or failed)."""
        return self.undecided == 0 and (self.extend is None or self.error is not None)

    def add_copies(self, copies: Sequence[int]) -> None:
        """Append copies to vote (adaptive sampling's next look)."""
        copies = [int(j) for j in copies]
        self.copies += copies
        self.labels = np.concatenate([self.labels, np.full(len(copies), -1, dtype=np.int64)])
        self.undecided += len(copies)

    @classmethod
    def failed(cls, image_id: str, error: BaseException) -> "ImageJob":
        """A job for an image that could not be loaded: no rows, the error kept."""
        return cls(image_id, None, None, [], np.zeros(0, dtype=np.int64), 0, error=error)

    @classmethod
    def of(cls, image_id: str, image: Any, shape: tuple[int, ...], copies) -> "ImageJob":
        copies = [int(j) for j in copies]
        return cls(image_id, image, tuple(shape), copies, np.full(len(copies), -1, dtype=np.int64), len(copies))


#: Per batch row: (image id, copy index j, vote index k), or None for a padding row.
RowIds = list[tuple[str, int, int] | None]


class Backend(Protocol):
    """The device side the scheduler drives (``executor.DeviceExecutor``, or a stub in tests)."""

    def use_shape(self, shape: tuple[int, ...]) -> None:
        """Make the slot buffer hold rows of ``shape`` (called only when no slot is open)."""

    def open(self, job: ImageJob, slots: np.ndarray, copies: list[int]) -> None:
        """Write the noisy copies ``copies`` of ``job``'s image into slot rows ``slots``."""

    def labels(self, rows: np.ndarray, ids: RowIds) -> np.ndarray:
        """The next vote of slot rows ``rows``: int64 ``[len(rows)]``, -1 where logits are not finite."""


class _Slots:
    """Host-side vote state of the ``size`` rows of the device buffer (-1 job: free slot)."""

    def __init__(self, size: int, num_classes: int):
        self.job = np.full(size, -1, dtype=np.int64)
        self.pos = np.zeros(size, dtype=np.int64)  # position in the job's ``copies``
        self.copy = np.zeros(size, dtype=np.int64)  # copy index j
        self.done = np.zeros(size, dtype=np.int64)  # votes cast
        self.counts = np.zeros((size, num_classes), dtype=np.int64)
        self.first = np.full((size, num_classes), UNSEEN, dtype=np.int64)

    def free(self) -> np.ndarray:
        return np.flatnonzero(self.job < 0)

    def active(self) -> np.ndarray:
        return np.flatnonzero(self.job >= 0)

    def open(self, idx: np.ndarray, uid: int, pos: np.ndarray, copies: np.ndarray) -> None:
        self.job[idx] = uid
        self.pos[idx] = pos
        self.copy[idx] = copies

    def close(self, idx: np.ndarray) -> None:
        self.job[idx] = -1
        self.done[idx] = 0
        self.counts[idx] = 0
        self.first[idx] = UNSEEN


def majority_decided(counts: np.ndarray, first: np.ndarray, done: np.ndarray, votes: int,
                     early_exit: bool) -> tuple[np.ndarray, np.ndarray]:
    """Leader and whether it is final, for each copy.

    Args:
        counts: int64 [M, C] votes per label so far.
        first: int64 [M, C] index of the first vote for each label (``UNSEEN`` if none).
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


class VoteScheduler:
    """Streams the copies of a sequence of images through ``batch_size`` slots and counts votes.

    Args:
        batch_size: slot rows.
        num_classes: labels are 0..num_classes-1.
        votes: K votes per copy (majority, ties to the earliest vote).
        early_exit: skip votes that cannot change a copy's label (exact).
        fixed_shape: run every batch over all ``batch_size`` rows (free slots are padding).
        unet_calls_per_row: the purifier's denoiser calls per vote (for the call counts).
        model_name: names the model in :class:`NonFiniteOutputError` messages.
        max_images: the most images in flight or waiting to be yielded in order (default
            2 batch_size + 2); bounds the memory of images held while an earlier one finishes.
    """

    def __init__(self, batch_size: int, num_classes: int, votes: int, *, early_exit: bool = True,
                 fixed_shape: bool = False, unet_calls_per_row: int = 0, model_name: str = "model",
                 max_images: int | None = None):
        self.max_images = int(max_images) if max_images else 2 * int(batch_size) + 2
        self.batch_size = int(batch_size)
        self.num_classes = int(num_classes)
        self.votes = int(votes)
        self.early_exit = bool(early_exit)
        self.fixed_shape = bool(fixed_shape)
        self.unet_calls_per_row = int(unet_calls_per_row)
        self.model_name = model_name

    def run(self, jobs: Iterator[ImageJob], backend: Backend, *, isolate: bool = False) -> Iterator[ImageJob]:
        """Vote on every copy of every job; yield each job, in order, once all its labels are set.

        ``jobs`` is consumed lazily, one job ahead of need. ``isolate``: a job whose rows give
        NaN/Inf logits is closed with ``error`` set instead of raising.
        """
        slots = _Slots(self.batch_size, self.num_classes)
        live: dict[int, ImageJob] = {}
        order: deque[ImageJob] = deque()  # admitted jobs, input order, until yielded
        held: ImageJob | None = None  # the next job, pulled but not yet admitted
        exhausted = False
        shape: tuple[int, ...] | None = None  # the rows' shape in the backend's buffer
        uid = 0
        self._clock = time.perf_counter()  # the end of the previous batch (see VoteStats.seconds)
        while True:
            # 0. Looks: a job whose copies are all decided gets its next copies (or is done).
            for job in order:
                if job.undecided == 0 and job.extend is not None and job.error is None:
                    more = job.extend(job)
                    if len(more):
                        job.add_copies(more)
                    else:
                        job.extend = None
            # 1. Open copies into the free slots: the oldest job with unopened copies first,
            #    pulling the next image when none has any.
            free = slots.free()
            while free.size:
                feeding = next((j for j in order if j.next_pos < len(j.copies)), None)
                if feeding is None:
                    if len(order) >= self.max_images:
                        break
                    if held is None and not exhausted:
                        held = next(jobs, None)
                        exhausted = held is None
                    if held is None:
                        break
                    if held.copies and held.shape != shape:  # (failed and empty jobs need no rows)
                        if slots.active().size:
                            break  # another image size: let the current rows drain first
                        backend.use_shape(held.shape)
                        shape = held.shape
                    job, held = held, None
                    job.uid, uid = uid, uid + 1
                    job.started = job.finished = time.perf_counter()
                    live[job.uid] = job
                    order.append(job)
                    continue
                take = min(free.size, len(feeding.copies) - feeding.next_pos)
                self._open(feeding, slots, backend, free[:take])
                free = free[take:]
            # 2. Hand back finished jobs, in input order.
            while order and order[0].done:
                job = order.popleft()
                del live[job.uid]
                yield job
            if not slots.active().size:
                if exhausted and held is None and not order:
                    return
                continue
            # 3. One batch: the next vote of every open copy.
            self._step(slots, backend, live, isolate)

    def _open(self, job: ImageJob, slots: _Slots, backend: Backend, idx: np.ndarray) -> None:
        pos = np.arange(job.next_pos, job.next_pos + idx.size, dtype=np.int64)
        job.next_pos += idx.size
        copies = [job.copies[p] for p in pos]
        backend.open(job, idx, copies)
        slots.open(idx, job.uid, pos, np.asarray(copies, dtype=np.int64))

    def _fail(self, job: ImageJob, slots: _Slots, error: BaseException) -> None:
        """Stop a job: drop its open rows, open no more of its copies, keep the error."""
        slots.close(np.flatnonzero(slots.job == job.uid))
        job.error = error
        job.next_pos = len(job.copies)
        job.undecided = 0
        job.finished = time.perf_counter()

    def _charge(self, job: ImageJob, rows: int) -> None:
        job.stats.unet_calls += rows * self.unet_calls_per_row
        job.stats.classifier_calls += rows

    def _step(self, slots: _Slots, backend: Backend, live: dict[int, ImageJob], isolate: bool) -> None:
        active = slots.active()
        rows = np.arange(self.batch_size) if self.fixed_shape else active  # free rows: padding
        valid = slots.job[rows] >= 0
        n_pad = int(rows.size - valid.sum())
        ids: RowIds = [(live[int(slots.job[s])].image_id, int(slots.copy[s]), int(slots.done[s])) if ok else None
                       for s, ok in zip(rows.tolist(), valid.tolist())]
        labels = backend.labels(rows, ids)
        voted, label = rows[valid], labels[valid]
        if (label < 0).any():
            voted, label = self._drop_non_finite(slots, live, voted, label, isolate)
            if not voted.size:
                return
        # Work done, per image (padding charged to the oldest image in the batch).
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        uids, per_job = np.unique(slots.job[voted], return_counts=True)
        for u, c in zip(uids.tolist(), per_job.tolist()):
            st = live[u].stats
            self._charge(live[u], c)
            st.batches += 1
            st.seconds += elapsed * c / voted.size
        live[int(uids[0])].stats.rows_padded += n_pad
        # Vote bookkeeping, vectorized over the batch's rows.
        k = slots.done[voted]
        slots.counts[voted, label] += 1
        slots.first[voted, label] = np.minimum(slots.first[voted, label], k)
        slots.done[voted] = k + 1
        leader, decided = majority_decided(slots.counts[voted], slots.first[voted], slots.done[voted],
                                           self.votes, self.early_exit)
        if decided.any():
            closing, lead = voted[decided], leader[decided]
            owner = slots.job[closing]
            now = time.perf_counter()
            for u in np.unique(owner).tolist():
                mine = owner == u
                job = live[u]
                job.labels[slots.pos[closing[mine]]] = lead[mine]
                job.undecided -= int(mine.sum())
                job.stats.votes_skipped += int((self.votes - slots.done[closing[mine]]).sum())
                job.finished = now
            slots.close(closing)

    def _drop_non_finite(self, slots: _Slots, live: dict[int, ImageJob], voted: np.ndarray, label: np.ndarray,
                         isolate: bool) -> tuple[np.ndarray, np.ndarray]:
        """Raise for (or, isolating, fail) every job with a NaN/Inf row; the other rows remain."""
        bad = voted[label < 0]
        for u in np.unique(slots.job[bad]).tolist():
            job = live[u]
            copies = sorted(int(slots.copy[s]) for s in bad if slots.job[s] == u)
            error = NonFiniteOutputError(
                f"image {job.image_id!r}: {self.model_name} produced NaN/Inf logits "
                f"(copies {copies[0]}..{copies[-1]}); check the checkpoint and the precision setting "
                f"(try precision: fp32)")
            if not isolate:
                raise error
            self._charge(job, int((slots.job[voted] == u).sum()))
            self._fail(job, slots, error)
        keep = slots.job[voted] >= 0  # the failed jobs' rows are closed now
        return voted[keep], label[keep]
