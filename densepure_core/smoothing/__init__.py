"""The smoothed base classifier: noisy copies -> K purifications -> classify -> majority vote.

For an image x in [0, 1] and copy index j, the noisy copy is x + sigma * e_j with e_j drawn from
the stream seeded by (run seed, image id, j, SMOOTH). The base classifier's label for that copy
is the majority of K votes; vote k purifies the same noisy copy with reverse-process noise
seeded by (run seed, image id, j, k, REVERSE) and classifies the result. Ties go to the label
that appeared first (the earliest vote). With K = 1 and the ``none`` purifier this is Cohen
et al.'s f(x + e) (on the unclipped copy); with the one-shot purifier it is Carlini et al.'s DDS.

The engine that makes DensePure's (n0 + n) x K x S UNet calls per image affordable has two
halves: ``scheduler.py`` (host side: slots, vote counting, exact early exit; no models) and
``executor.py`` (device side: buffers, noise, autocast, CUDA graphs). This module is the short
facade over them; ``options.EngineOptions`` holds every switch.

Example:
    >>> sbc = SmoothedBaseClassifier(classifier, purifier, sigma=0.5, votes=10, num_classes=10)
    >>> counts0, counts, stats = sbc.selection_and_estimation(x, "img-0", n0=100, n=1000)
    >>> for res in sbc.certify_many(prefetch((i, load(i)) for i in ids), n0=100, n=1000):
    ...     print(res.image_id, res.counts0, res.counts, res.stats.votes_skipped)

Tests: ``tests/densepure_core/smoothing/test_smoothing.py`` and ``test_scheduler.py``; speed:
``benchmarks/engine.py`` (CPU) and ``benchmarks/gpu_models.py`` (GPU).

Imports :mod:`densepure_core.diffusion` (the purifiers), :mod:`densepure_core.certification` (the
adaptive stopping rule), :mod:`densepure_core.rng` and :mod:`densepure_core.models` (``accel``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from densepure_core.rng import NOISE_DEVICES

from .adaptive import AdaptivePlan, AdaptiveState
from .executor import DeviceExecutor
from .options import EngineOptions
from .prefetch import prefetch
from .scheduler import ImageJob, NonFiniteOutputError, VoteScheduler, VoteStats, majority_decided

__all__ = ["VoteStats", "CertifiedImage", "AdaptivePlan", "AdaptiveState", "SmoothedBaseClassifier", "EngineOptions", "NonFiniteOutputError",
           "majority_decided", "prefetch", "NOISE_DEVICES"]


@dataclass
class CertifiedImage:
    """CERTIFY's counts for one image, from :meth:`SmoothedBaseClassifier.certify_many`.

    Attributes:
        image_id: the id it was given.
        counts0: int64 ``[num_classes]``, the base classifier over copies 0..n0-1 (selection).
        counts: int64 ``[num_classes]``, over copies n0..n0+n-1 (estimation).
        stats: the work done for this image.
        seconds: wall time from its first copy entering a batch to its last copy's label
            (images overlap in the stream, so these do not add up to the total).
        error: with ``errors="return"``: the exception that stopped this image (its loading
            error, or :class:`NonFiniteOutputError`); the counts are then all zero. Else None.
        adaptive: with adaptive sampling, where the image stopped (n_used, n_a, the bounds,
            the stop reason, the looks); None for fixed sampling.
    """

    image_id: str
    counts0: np.ndarray
    counts: np.ndarray
    stats: VoteStats
    seconds: float
    error: BaseException | None = None
    adaptive: AdaptiveState | None = None

    @property
    def n_used(self) -> int:
        """Estimation copies drawn (n for fixed sampling)."""
        return int(self.counts.sum())


class SmoothedBaseClassifier:
    """Vote counts of the purified-and-classified base classifier over Gaussian copies.

    Args:
        classifier: module mapping images in [0,1] ``[B,C,H,W]`` to logits ``[B, num_classes]``.
        purifier: a ``purify.PurifierProtocol`` (``purify.make_purifier``, or any callable
            ``(x_noisy01, noise) -> [B,C,H,W]`` with ``stochastic`` and
            ``unet_calls_per_purification``).
        sigma: smoothing noise level in [0,1] pixel units.
        votes: K purifications per noisy copy (majority vote).
        num_classes: length of the count vectors.
        run_seed: the run's seed.
        options: how the engine runs (``EngineOptions``; default: batch 256, fp32, CPU noise).

    Guarantees: a copy's label depends only on (run_seed, image id, copy index, K, the models,
    the noise mode), never on batch size, copy order, padding, the other images in the stream or
    early exit (up to the models' own batch-size-dependent float rounding).

    Build it after the models are on their device and in their dtype: ``channels_last`` and
    ``compile`` prepare the modules here. Reuse one instance per (method, sigma): slot buffers,
    compiled modules and captured CUDA graphs live in it.
    """

    def __init__(self, classifier, purifier, sigma: float, *, votes: int = 1, num_classes: int,
                 run_seed: int = 0, options: EngineOptions | None = None):
        options = options or EngineOptions()
        if votes < 1:
            raise ValueError(f"votes must be >= 1 (got {votes})")
        if votes > 1 and not getattr(purifier, "stochastic", False):
            raise ValueError("votes > 1 needs a stochastic purifier (densepure or full); "
                             "other purifiers give the same label every vote")
        device = options.device
        if device is None:
            try:
                device = next(classifier.parameters()).device
            except (AttributeError, StopIteration):
                device = torch.device("cpu")
        self.sigma = float(sigma)
        self.votes = int(votes)
        self.num_classes = int(num_classes)
        self.options = options
        self.device = torch.device(device)
        self.executor = DeviceExecutor(classifier, purifier, sigma, run_seed, options, self.device)
        self.scheduler = VoteScheduler(
            options.batch_size, self.num_classes, self.votes, early_exit=options.early_exit,
            fixed_shape=options.fixed_shape, model_name=options.model_name,
            unet_calls_per_row=int(getattr(purifier, "unet_calls_per_purification", 0)))

    @property
    def purifier(self):
        """The purifier as the engine runs it (prepared by ``channels_last``/``compile``)."""
        return self.executor.purifier

    @property
    def classifier(self):
        """The classifier as the engine runs it."""
        return self.executor.classifier

    # -- Cohen et al.'s CERTIFY, steps 1 and 2 ------------------------------------------------
    def selection_and_estimation(self, x01: torch.Tensor, image_id: str, n0: int, n: int
                                 ) -> tuple[np.ndarray, np.ndarray, VoteStats]:
        """CERTIFY's two count vectors: copies 0..n0-1 (selection) and n0..n0+n-1 (estimation).

        Both sets stream through the same batches; they are disjoint copies with their own
        noise streams, so the estimation counts are fresh draws (what the bound assumes).
        Returns (counts0 [C], counts [C], stats).
        """
        stats = VoteStats()
        labels = self.labels(x01, image_id, range(n0 + n), stats)
        return self._count(labels[:n0]), self._count(labels[n0:]), stats

    def certify_many(self, images: Iterable[tuple[str, torch.Tensor | BaseException]], n0: int, n: int,
                     *, errors: str = "raise", adaptive: AdaptivePlan | None = None) -> Iterator[CertifiedImage]:
        """:meth:`selection_and_estimation` for a stream of images, yielded in input order.

        Copies of the next image fill the slots that the current image's decided copies free,
        so batches stay full across image boundaries. ``images`` is consumed lazily, one image
        ahead of need: wrap it in :func:`prefetch` to load images while the device works.

        Args:
            images: ``(image_id, x01 [C, H, W] in [0, 1])`` pairs; in place of x01, the
                exception that loading the image raised (passed through, see ``errors``).
            n0, n: selection and estimation copies per image.
            errors: ``"raise"``: a loading exception or NaN/Inf logits stop the stream;
                ``"return"``: that image is yielded with ``error`` set (and zero counts), its
                rows are dropped, and the other images go on unaffected.
            adaptive: adaptive sampling (:class:`AdaptivePlan`; its n0 must equal ``n0``, and
                ``n`` is ignored: up to ``adaptive.n_max`` estimation copies, in looks). An
                image's copies are those of fixed CERTIFY, ``counts`` over the first n_used.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors={errors!r}: expected 'raise' or 'return'")
        if adaptive is not None and adaptive.n0 != n0:
            raise ValueError(f"adaptive.n0 = {adaptive.n0} differs from n0 = {n0}")
        jobs = (self._job(image_id, x01, range(n0 + n), errors, adaptive) for image_id, x01 in images)
        for job in self.scheduler.run(jobs, self.executor, isolate=errors == "return"):
            labels = job.labels if job.error is None else np.zeros(0, dtype=np.int64)
            yield CertifiedImage(job.image_id, self._count(labels[:n0]), self._count(labels[n0:]), job.stats,
                                 job.finished - job.started, job.error, job.info)

    # -- the base classifier ------------------------------------------------------------------
    def labels(self, x01: torch.Tensor, image_id: str, copies: range | list[int],
               stats: VoteStats | None = None) -> np.ndarray:
        """The base classifier's label for each copy index in ``copies`` (int64 [len(copies)])."""
        job = self._job(image_id, x01, copies)
        for _ in self.scheduler.run(iter([job]), self.executor):
            pass
        if stats is not None:
            stats.add(job.stats)
        return job.labels

    def counts(self, x01: torch.Tensor, image_id: str, copies: range | list[int],
               stats: VoteStats | None = None) -> np.ndarray:
        """Per-class counts (int64 [num_classes]) of the base classifier over ``copies``."""
        return self._count(self.labels(x01, image_id, copies, stats))

    def _count(self, labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)

    def _job(self, image_id: str, x01, copies, errors: str = "raise", adaptive: AdaptivePlan | None = None
             ) -> ImageJob:
        if isinstance(x01, BaseException):
            if errors == "raise":
                raise x01
            return ImageJob.failed(image_id, x01)
        if x01.ndim != 3:
            raise ValueError(f"image {image_id!r}: x01 must be [C, H, W], got shape {tuple(x01.shape)}")
        x01 = x01.to(self.device, torch.float32)
        if adaptive is None:
            return ImageJob.of(image_id, x01, tuple(x01.shape), copies)
        job = ImageJob.of(image_id, x01, tuple(x01.shape), adaptive.first_copies())
        job.info = AdaptiveState()
        job.extend = lambda j: adaptive.next_copies(j.labels, j.info)
        return job
