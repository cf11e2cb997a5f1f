"""The smoothed base classifier: noisy copies -> K purifications -> classify -> majority vote.

For an image x in [0, 1] and copy index j, the noisy copy is x + sigma * e_j with e_j drawn from
the stream seeded by (run seed, image id, j, SMOOTH). The base classifier's label for that copy
is the majority of K votes; vote k purifies the same noisy copy with reverse-process noise
seeded by (run seed, image id, j, k, REVERSE) and classifies the result. Ties go to the label
that appeared first (the earliest vote). With K = 1 and the ``none`` purifier this is Cohen
et al.'s f(x + e); with the one-shot purifier it is Carlini et al.'s DDS.

The engine (what makes DensePure's (n0 + n) x K x S UNet calls per image affordable):

- Slots. ``batch_size`` rows live on the device in one fixed buffer; a row is one noisy copy
  and each batch runs the next vote of every open copy (copies x votes in one batch). A copy
  whose label is decided frees its slot, and the next copy is written into it in place, so
  batches stay full; :meth:`SmoothedBaseClassifier.certify_many` keeps filling slots with the
  next image's copies, so there is no half-empty tail per image either. A row's result depends
  only on its ids, never on the batch it lands in.
- One host round trip per batch: the labels (int64 ``[B]``, -1 for a row with NaN/Inf logits)
  come back for the vote bookkeeping, nothing else. Noise, purification, resize/normalize
  (``models.Classifier``) and argmax stay on the device.
- Exact early exit: after m of K votes, the leader L cannot be overtaken when every other label
  y has count[y] + (K - m) < count[L], or equality with L first seen before y. The remaining
  votes are skipped (``VoteStats.votes_skipped``); the label is the one all K votes would give.
- A ``purify.Purifier`` runs through :class:`_FastPurifier`: the same arithmetic on the same
  shapes (bit-identical on the CPU, checked by the tests), but the per-step coefficients are
  cached on the device instead of copied from numpy at every step (each such copy is a host
  synchronization on CUDA), and a step's reverse noise is drawn after its UNet call is queued,
  so CPU noise generation overlaps the GPU's work. Any other callable purifier is called as is.

Switches (all off by default; each checked against the default path in the tests):

- ``precision``: ``"bf16"`` / ``"fp16"`` autocast on the device (outputs within tolerance of fp32).
- ``channels_last``, ``compile``: ``accel.prepare_module`` on the UNet and the classifier
  (outputs equal to float rounding; compile takes tens of seconds per input shape; keep
  ``pad_batches`` on so there is one shape).
- ``cuda_graphs``: capture purify + classify + argmax for the fixed batch shape once and replay
  it for every batch (implies padded batches; CUDA and a ``purify.Purifier`` only). Cuts the
  CPU launch cost of the S UNet calls, which matters for small models or small batches.
- ``noise_device``: ``"cpu"`` (default; per-row CPU generators, counts identical on every
  device) or ``"device"`` (counter-based Philox on the model's device; no per-row host work;
  counts then differ from ``"cpu"`` and may differ between CPU and GPU in near-tie copies;
  see ``rng.py``).

Example:
    >>> sbc = SmoothedBaseClassifier(classifier, purifier, sigma=0.5, votes=10, num_classes=10)
    >>> counts0, counts, stats = sbc.selection_and_estimation(x, "img-0", n0=100, n=1000)
    >>> for res in sbc.certify_many(prefetch((i, load(i)) for i in ids), n0=100, n=1000):
    ...     print(res.image_id, res.counts0, res.counts, res.stats.votes_skipped)

Tests: ``.venv/bin/python -m pytest -p no:cacheprovider tests/densepure_core/test_smoothing.py``;
speed: ``benchmarks/engine.py`` (CPU) and ``benchmarks/gpu_models.py`` (GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from .rng import (NOISE_DEVICES, REVERSE, SMOOTH, CounterNoise, RowNoise, _keys_tensor,
                  derive_seed, gaussian_rows, make_noise)

__all__ = ["VoteStats", "CertifiedImage", "SmoothedBaseClassifier", "NonFiniteOutputError",
           "majority_decided", "prefetch", "NOISE_DEVICES"]

_UNSEEN = np.iinfo(np.int64).max
T = TypeVar("T")


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
    """

    image_id: str
    counts0: np.ndarray
    counts: np.ndarray
    stats: VoteStats
    seconds: float
    error: BaseException | None = None


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


# --------------------------------------------------------------------------- fast purifier
class _FastPurifier:
    """``purify.Purifier``'s arithmetic with the per-step coefficients cached on the device.

    ``purify.reverse_step`` builds every coefficient from float64 numpy and copies it to the
    device at every step; on CUDA each such copy (pageable memory) blocks the host until the
    GPU is idle, and it cannot be captured in a CUDA graph. Here the same tensors (same values,
    same ``[B, 1, 1, 1]`` shapes, made by purify's own helpers) are built once per batch shape,
    and every step runs the same torch ops in the same order, so outputs are bit-identical to
    ``Purifier.__call__`` on a given device. One deliberate reordering: a step's noise is drawn
    after its denoiser call is queued (each row has its own stream, so the values are the
    same), which lets CPU noise generation overlap the GPU's UNet work. A ``UNetDenoiser``'s
    UNet dtype is read once, here: cast the UNet before building the smoothed classifier.
    """

    def __init__(self, purifier: Any):
        from . import purify

        self.p = purifier
        self._purify = purify
        self._spaced = (purify.respace(purifier.schedule, purifier.timesteps)
                        if purifier.kind in ("densepure", "full") else None)
        self._cache: dict[tuple, dict[str, list]] = {}
        self._denoise = purifier.denoiser
        if isinstance(purifier.denoiser, purify.UNetDenoiser):
            # UNetDenoiser asks the UNet for its dtype at every call, and diffusers answers by
            # walking every module (~1 ms per call on the digits UNet, more on ADM): read it once.
            # The same casts as UNetDenoiser.__call__, so the same numbers.
            unet = purifier.denoiser.unet
            dtype = getattr(unet, "dtype", None)

            def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return unet(x_t.to(dtype or x_t.dtype), t).sample.to(x_t.dtype)

            self._denoise = denoise

    @property
    def draws(self) -> int:
        """Noise draws per call (S - 1 for DensePure, t* for the full chain, else 0)."""
        return len(self.p.timesteps) - 1 if self.p.stochastic else 0

    def _coefs(self, like: torch.Tensor) -> dict[str, list]:
        key = (like.shape[0], like.ndim, like.dtype, like.device)
        if key in self._cache:
            return self._cache[key]
        pu, p, sched = self._purify, self.p, self.p.schedule
        b = like.shape[0]
        # A zero-element template: purify's helpers only read its ndim, dtype, device and rows.
        tmpl = torch.empty((b, *([0] * (like.ndim - 1))), dtype=like.dtype, device=like.device)
        ts = [p.t_star] if self._spaced is None else list(self._spaced.timesteps)
        c: dict[str, list] = {"t": [], "a": [], "b": []}
        for t in ts:
            abar = sched.alphas_cumprod[np.full(b, int(t))]
            c["t"].append(pu._row_timesteps(int(t), tmpl))
            if sched.prediction_type == "epsilon":
                c["a"].append(pu._to_rows(np.sqrt(1.0 / abar), tmpl))
                c["b"].append(pu._to_rows(np.sqrt(1.0 / abar - 1), tmpl))
            elif sched.prediction_type == "v_prediction":
                c["a"].append(pu._to_rows(np.sqrt(abar), tmpl))
                c["b"].append(pu._to_rows(np.sqrt(1.0 - abar), tmpl))
        if self._spaced is not None:
            sp, vt = self._spaced, sched.variance_type
            c["coef1"] = [pu._to_rows(np.full(b, sp.posterior_mean_coef1[k]), tmpl) for k in range(sp.num_steps)]
            c["coef2"] = [pu._to_rows(np.full(b, sp.posterior_mean_coef2[k]), tmpl) for k in range(sp.num_steps)]
            if vt == "learned_range":
                c["min_log"] = [pu._to_rows(np.full(b, sp.posterior_log_variance_clipped[k]), tmpl)
                                for k in range(sp.num_steps)]
                c["max_log"] = [pu._to_rows(np.full(b, np.log(sp.betas[k])), tmpl) for k in range(sp.num_steps)]
            else:
                c["log_var"] = [sp.log_variance(k, vt, None, tmpl) for k in range(sp.num_steps)]
        self._cache[key] = c
        return c

    def _x0(self, model_out: torch.Tensor, x_t: torch.Tensor, c: dict, i: int) -> torch.Tensor:
        # purify.predict_x0 on an already split output, clip=True.
        pt = self.p.schedule.prediction_type
        if pt == "sample":
            x0 = model_out
        else:
            x0 = c["a"][i] * x_t - c["b"][i] * model_out
        return x0.clamp(-1, 1)

    def __call__(self, x_noisy01: torch.Tensor, noise) -> torch.Tensor:
        p, pu = self.p, self._purify
        if p.kind == "none":
            return x_noisy01
        x_t = pu.noisy_to_xt(x_noisy01, p.schedule.alphas_cumprod[p.t_star])
        c = self._coefs(x_t)
        if p.kind == "one_shot":
            out = self._denoise(x_t, c["t"][0])
            eps, _ = pu._split_output(out, x_t, p.schedule)
            return (self._x0(eps, x_t, c, 0) + 1) / 2
        if noise is None and self.draws:
            raise ValueError(f"the {p.kind!r} purifier draws reverse noise: pass a noise source")
        vt = p.schedule.variance_type
        x = x_t
        x0 = x_t
        for k in range(self._spaced.num_steps - 1, -1, -1):
            out = self._denoise(x, c["t"][k])
            z = noise.draw() if k > 0 else None  # after the launch: overlaps the UNet on a GPU
            eps, v = pu._split_output(out, x, p.schedule)
            x0 = self._x0(eps, x, c, k)
            if k == 0:
                break
            mean = c["coef1"][k] * x0 + c["coef2"][k] * x
            if vt == "learned_range":
                frac = (v + 1) / 2
                log_var = frac * c["max_log"][k] + (1 - frac) * c["min_log"][k]
            else:
                log_var = c["log_var"][k]
            x = mean + torch.exp(0.5 * log_var) * z.to(device=x.device, dtype=x.dtype)
        return (x0 + 1) / 2


class _StagedNoise:
    """Noise drawn ahead into a device buffer ``[draws, B, *shape]``; draw t returns slice t."""

    def __init__(self, z: torch.Tensor):
        self.z = z
        self.shape = tuple(z.shape[2:])
        self._t = 0

    def __len__(self) -> int:
        return int(self.z.shape[1])

    def draw(self) -> torch.Tensor:
        out = self.z[self._t]
        self._t += 1
        return out


# --------------------------------------------------------------------------- slots and jobs
@dataclass
class _Job:
    """One image's copies going through the engine."""

    image_id: str
    x01: torch.Tensor | None  # [C, H, W] float32 on the device (None: failed before it started)
    copies: list[int]
    labels: np.ndarray  # int64 [len(copies)], -1 until decided
    undecided: int
    stats: VoteStats = field(default_factory=VoteStats)
    error: BaseException | None = None
    next_pos: int = 0  # next position of ``copies`` to open
    uid: int = -1
    started: float = 0.0
    finished: float = 0.0


class _Slots:
    """Host-side vote state of the ``size`` rows of the device buffer (-1 job: free slot)."""

    def __init__(self, size: int, num_classes: int):
        self.job = np.full(size, -1, dtype=np.int64)
        self.pos = np.zeros(size, dtype=np.int64)  # position in the job's ``copies``
        self.copy = np.zeros(size, dtype=np.int64)  # copy index j
        self.done = np.zeros(size, dtype=np.int64)  # votes cast
        self.counts = np.zeros((size, num_classes), dtype=np.int64)
        self.first = np.full((size, num_classes), _UNSEEN, dtype=np.int64)

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
        self.first[idx] = _UNSEEN


def _prepare_module(module, **kw):
    """``accel.prepare_module`` (channels_last, torch.compile), or a minimal stand-in."""
    try:
        from .accel import prepare_module
    except ImportError:  # pragma: no cover - accel.py ships with the package
        def prepare_module(module, *, channels_last, compile, device=None, compile_options=None):
            if device is not None:
                module = module.to(device)
            if channels_last:
                module = module.to(memory_format=torch.channels_last)
            return torch.compile(module, **dict(compile_options or {})) if compile else module
    return prepare_module(module, **kw)


class _CudaGraphRunner:
    """purify + classify + argmax for one fixed batch buffer, captured once, replayed per batch.

    Static inputs: the slot buffer itself (rows are written into it in place), and the reverse
    noise: per-row Philox keys (``noise_device="device"``, generated inside the graph) or the
    staged CPU draws ``[S-1, B, *shape]`` (``"cpu"``, copied in before each replay).
    """

    def __init__(self, sbc: "SmoothedBaseClassifier", buf: torch.Tensor):
        self.sbc = sbc
        self.buf = buf
        dev = buf.device
        bs, shape = buf.shape[0], tuple(buf.shape[1:])
        self.shape = shape
        self.draws = sbc._fast.draws if sbc._stochastic else 0
        if self.draws and sbc.noise_device == "device":
            self.keys = torch.zeros(bs, dtype=torch.int64, device=dev)
            self.valid = torch.zeros(bs, dtype=torch.bool, device=dev)
            make = lambda: CounterNoise.from_tensors(self.keys, self.valid, shape, buf.dtype)  # noqa: E731
        elif self.draws:
            self.z = torch.zeros((self.draws, bs, *shape), dtype=buf.dtype, device=dev)
            make = lambda: _StagedNoise(self.z)  # noqa: E731
        else:
            make = lambda: None  # noqa: E731
        # Warm up on a side stream (cuDNN/cuBLAS handles, autotuning, torch.compile), then capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                sbc._compute(buf, make())
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = sbc._compute(buf, make())

    def run(self, seeds: list[int | None] | None) -> torch.Tensor:
        if self.draws and self.sbc.noise_device == "device":
            keys, valid = _keys_tensor(seeds, self.buf.device)
            self.keys.copy_(keys)
            self.valid.copy_(valid)
        elif self.draws:
            host = torch.empty(tuple(self.z.shape), dtype=torch.float32, pin_memory=True)
            noise = RowNoise(seeds, self.shape, device=self.buf.device)
            for t in range(self.draws):
                noise.draw_into(host[t])
            self.z.copy_(host, non_blocking=True)
        self.graph.replay()
        return self.out


# --------------------------------------------------------------------------- the classifier
class SmoothedBaseClassifier:
    """Vote counts of the purified-and-classified base classifier over Gaussian copies.

    Args:
        classifier: module mapping images in [0,1] ``[B,C,H,W]`` to logits ``[B, num_classes]``.
        purifier: ``purifier(x_noisy01 [B,C,H,W], noise) -> [B,C,H,W]`` with attributes
            ``stochastic`` (bool) and ``unet_calls_per_purification`` (int), as made by
            :func:`densepure_core.purify.make_purifier` (which takes the fast path); ``noise``
            is a ``RowNoise``/``CounterNoise`` with a ``draw()`` method, or None.
        sigma: smoothing noise level in [0,1] pixel units.
        votes: K purifications per noisy copy (majority vote).
        num_classes: length of the count vectors.
        batch_size: image rows per model call.
        early_exit: skip votes that cannot change a copy's label (exact).
        run_seed: the run's seed.
        pad_batches: pad every batch to ``batch_size`` rows (static shapes for compiled/graphed
            GPU models); padding rows are computed and discarded, never counted as calls.
        precision: "fp32", "bf16" or "fp16" (autocast on the device).
        device: where the rows live (default: the classifier's device).
        model_name: a name for error messages.
        noise_device: "cpu" (per-row CPU generators; the default, identical counts on every
            device) or "device" (counter-based Philox on ``device``; see ``rng.py``).
        channels_last: NHWC UNet and classifier (``accel.prepare_module``; modifies the modules
            in place).
        compile: ``torch.compile`` the UNet and the classifier (``accel.prepare_module``).
        compile_options: keyword arguments for ``torch.compile``.
        cuda_graphs: capture and replay the fixed-shape purify + classify step (CUDA only,
            ``purify.Purifier`` only; implies padded batches).

    Guarantees: a copy's label depends only on (run_seed, image id, copy index, K, the models,
    the noise mode), never on batch size, copy order, padding, the other images in the stream or
    early exit (up to the models' own batch-size-dependent float rounding).

    Build it after the models are on their device and in their dtype: the switches prepare the
    modules here, and the fast path reads the UNet's dtype once. Reuse one instance per
    (method, sigma): slot buffers, compiled modules and captured CUDA graphs live in it.
    """

    def __init__(self, classifier, purifier, sigma: float, *, votes: int = 1, num_classes: int,
                 batch_size: int = 256, early_exit: bool = True, run_seed: int = 0,
                 pad_batches: bool = False, precision: str = "fp32", device: torch.device | str | None = None,
                 model_name: str = "model", noise_device: str = "cpu", channels_last: bool = False,
                 compile: bool = False, compile_options: Mapping[str, Any] | None = None,
                 cuda_graphs: bool = False):
        if votes < 1:
            raise ValueError(f"votes must be >= 1 (got {votes})")
        if votes > 1 and not getattr(purifier, "stochastic", False):
            raise ValueError("votes > 1 needs a stochastic purifier (densepure or full); "
                             "other purifiers give the same label every vote")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={precision!r}: expected 'fp32', 'bf16' or 'fp16'")
        if noise_device not in NOISE_DEVICES:
            raise ValueError(f"noise_device={noise_device!r}: expected one of {NOISE_DEVICES}")
        self.sigma = float(sigma)
        self.votes = int(votes)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.early_exit = bool(early_exit)
        self.run_seed = int(run_seed)
        self.pad_batches = bool(pad_batches)
        self.precision = precision
        self.model_name = model_name
        self.noise_device = noise_device
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        if device is None:
            try:
                device = next(classifier.parameters()).device
            except (AttributeError, StopIteration):
                device = torch.device("cpu")
        self.device = torch.device(device)
        from .purify import Purifier

        is_purifier = isinstance(purifier, Purifier)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device (got {self.device}); set cuda_graphs: false")
        if self.cuda_graphs and not is_purifier:
            raise ValueError("cuda_graphs needs a purify.Purifier (make_purifier); got "
                             f"{type(purifier).__name__}")
        if self.channels_last or self.compile:
            purifier, classifier = self._prepare(purifier, classifier, compile_options)
        self.classifier = classifier
        self.purifier = purifier
        self._fast = _FastPurifier(purifier) if is_purifier else None
        self._stochastic = bool(getattr(purifier, "stochastic", False))
        self._calls_per_row = int(getattr(purifier, "unet_calls_per_purification", 0))
        self._fixed = self.pad_batches or self.cuda_graphs
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}  # per image shape: the slot rows
        self._graphs: dict[tuple[int, ...], _CudaGraphRunner] = {}

    # -- public ---------------------------------------------------------------------------
    def labels(self, x01: torch.Tensor, image_id: str, copies: range | list[int],
               stats: VoteStats | None = None) -> np.ndarray:
        """The base classifier's label for each copy index in ``copies`` (int64 [len(copies)])."""
        job = self._job(image_id, x01, copies)
        for _ in self._run(iter([job])):
            pass
        if stats is not None:
            stats.add(job.stats)
        return job.labels

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

    def certify_many(self, images: Iterable[tuple[str, torch.Tensor | BaseException]], n0: int, n: int,
                     *, errors: str = "raise") -> Iterator[CertifiedImage]:
        """CERTIFY's counts for a stream of images, yielded in input order.

        Copies of the next image fill the slots that the current image's decided copies free,
        so batches stay full across image boundaries. ``images`` is consumed lazily, one image
        ahead of need: wrap it in :func:`prefetch` to load images while the device works.
        Counts equal :meth:`selection_and_estimation`'s for every image.

        Args:
            images: ``(image_id, x01 [C, H, W] in [0, 1])`` pairs; in place of x01, the
                exception that loading the image raised (passed through, see ``errors``).
            n0, n: selection and estimation copies per image.
            errors: ``"raise"``: a loading exception or NaN/Inf logits stop the stream;
                ``"return"``: that image is yielded with ``error`` set (and zero counts), its
                rows are dropped, and the other images go on unaffected.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors={errors!r}: expected 'raise' or 'return'")
        jobs = (self._job(image_id, x01, range(n0 + n), errors) for image_id, x01 in images)
        for job in self._run(jobs, isolate=errors == "return"):
            labels = job.labels if job.error is None else np.zeros(0, dtype=np.int64)
            counts0 = np.bincount(labels[:n0], minlength=self.num_classes).astype(np.int64)
            counts = np.bincount(labels[n0:], minlength=self.num_classes).astype(np.int64)
            yield CertifiedImage(job.image_id, counts0, counts, job.stats, job.finished - job.started, job.error)

    # -- models ---------------------------------------------------------------------------
    def _prepare(self, purifier, classifier, compile_options):
        from .purify import Purifier, UNetDenoiser

        kw: dict[str, Any] = dict(channels_last=self.channels_last, compile=self.compile, device=self.device)
        if compile_options:
            kw["compile_options"] = dict(compile_options)
        if isinstance(classifier, torch.nn.Module):
            classifier = _prepare_module(classifier, **kw)
        if isinstance(purifier, Purifier) and purifier.denoiser is not None:
            den = purifier.denoiser
            if isinstance(den, UNetDenoiser):
                den = UNetDenoiser(_prepare_module(den.unet, **kw))
            elif isinstance(den, torch.nn.Module):
                den = _prepare_module(den, **kw)
            purifier = dataclasses.replace(purifier, denoiser=den)
        return purifier, classifier

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        # The autocast weight-cast cache must be off while a CUDA graph is captured.
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=not self.cuda_graphs)

    @torch.no_grad()
    def _compute(self, batch: torch.Tensor, noise) -> torch.Tensor:
        """Purify, classify, argmax on the device: int64 ``[B]``, -1 where a row's logits are not finite."""
        with self._autocast():
            purified = self._fast(batch, noise) if self._fast is not None else self.purifier(batch, noise)
            # No clamp here: plain RS (the "none" purifier) classifies the unclipped x + sigma e,
            # as Cohen et al. do and as the noise-trained classifiers were trained; purifiers
            # clip their own output to the image range.
            logits = self.classifier(purified)
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=1)
        return torch.where(finite, logits.argmax(dim=1), torch.full_like(finite, -1, dtype=torch.int64))

    def _batch_labels(self, batch: torch.Tensor, seeds: list[int | None] | None) -> np.ndarray:
        if self.cuda_graphs:
            shape = tuple(batch.shape[1:])
            runner = self._graphs.get(shape)
            if runner is None or runner.buf is not batch:
                runner = self._graphs[shape] = _CudaGraphRunner(self, batch)
            out = runner.run(seeds)
        else:
            noise = None
            if self._stochastic:
                noise = make_noise(seeds, tuple(batch.shape[1:]), self.device, batch.dtype,
                                   noise_device=self.noise_device)
            out = self._compute(batch, noise)
        # The batch's one host synchronization: exact early exit needs the labels.
        return out.cpu().numpy()

    # -- the engine -----------------------------------------------------------------------
    def _job(self, image_id: str, x01, copies, errors: str = "raise") -> _Job:
        if isinstance(x01, BaseException):
            if errors == "raise":
                raise x01
            return _Job(image_id=image_id, x01=None, copies=[], labels=np.zeros(0, dtype=np.int64),
                        undecided=0, error=x01)
        if x01.ndim != 3:
            raise ValueError(f"image {image_id!r}: x01 must be [C, H, W], got shape {tuple(x01.shape)}")
        copies = [int(j) for j in copies]
        return _Job(image_id=image_id, x01=x01.to(self.device, torch.float32), copies=copies,
                    labels=np.full(len(copies), -1, dtype=np.int64), undecided=len(copies))

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._buffers.get(shape)
        if buf is None:
            buf = self._buffers[shape] = torch.zeros((self.batch_size, *shape), dtype=torch.float32,
                                                     device=self.device)
        return buf

    def _device_index(self, idx: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _rows(self, buf: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """buf[idx] (a view when idx is one contiguous run)."""
        if idx[-1] - idx[0] + 1 == idx.size:
            return buf[int(idx[0]):int(idx[-1]) + 1]
        return buf.index_select(0, self._device_index(idx))

    def _open(self, job: _Job, slots: _Slots, buf: torch.Tensor, idx: np.ndarray) -> None:
        """Draw the smoothing noise of the job's next ``len(idx)`` copies into slots ``idx``."""
        pos = np.arange(job.next_pos, job.next_pos + idx.size, dtype=np.int64)
        job.next_pos += idx.size
        js = [job.copies[p] for p in pos]
        seeds = [derive_seed(self.run_seed, job.image_id, j, -1, SMOOTH) for j in js]
        eps = gaussian_rows(seeds, tuple(job.x01.shape), device=self.device, dtype=job.x01.dtype,
                            noise_device=self.noise_device)
        rows = job.x01.unsqueeze(0) + self.sigma * eps
        if idx[-1] - idx[0] + 1 == idx.size:
            buf[int(idx[0]):int(idx[-1]) + 1] = rows
        else:
            buf.index_copy_(0, self._device_index(idx), rows)
        slots.open(idx, job.uid, pos, np.asarray(js, dtype=np.int64))

    def _run(self, jobs: Iterator[_Job], isolate: bool = False) -> Iterator[_Job]:
        """Vote on every copy of every job; yield each job, in order, once all its labels are set.

        ``isolate``: a job whose rows give NaN/Inf logits is closed with ``error`` set instead
        of raising.
        """
        slots = _Slots(self.batch_size, self.num_classes)
        live: dict[int, _Job] = {}
        order: deque[_Job] = deque()
        feeding: _Job | None = None  # the job whose copies are being opened
        held: _Job | None = None  # the next job, pulled but not yet admitted
        exhausted = False
        buf: torch.Tensor | None = None
        uid = 0
        self._clock = time.perf_counter()  # the end of the previous batch (see VoteStats.seconds)
        while True:
            # 1. Open copies into the free slots, pulling the next image when one runs out.
            free = slots.free()
            while free.size:
                if feeding is None or feeding.next_pos >= len(feeding.copies):
                    if held is None and not exhausted:
                        held = next(jobs, None)
                        exhausted = held is None
                    if held is None:
                        break
                    if held.copies:  # (failed and empty jobs need no rows)
                        shape = tuple(held.x01.shape)
                        if buf is None or tuple(buf.shape[1:]) != shape:
                            if slots.active().size:
                                break  # another image size: let the current rows drain first
                            buf = self._buffer(shape)
                    feeding, held = held, None
                    feeding.uid, uid = uid, uid + 1
                    feeding.started = feeding.finished = time.perf_counter()
                    live[feeding.uid] = feeding
                    order.append(feeding)
                    continue
                take = min(free.size, len(feeding.copies) - feeding.next_pos)
                self._open(feeding, slots, buf, free[:take])
                free = free[take:]
            # 2. Hand back finished jobs, in input order.
            while order and order[0].undecided == 0:
                job = order.popleft()
                del live[job.uid]
                yield job
            if not slots.active().size:
                if exhausted and held is None and not order:
                    return
                continue
            # 3. One batch: the next vote of every open copy.
            self._step(slots, buf, live, isolate)

    def _fail(self, job: _Job, slots: _Slots, error: BaseException) -> None:
        """Stop a job: drop its open rows, open no more of its copies, keep the error."""
        slots.close(np.flatnonzero(slots.job == job.uid))
        job.error = error
        job.next_pos = len(job.copies)
        job.undecided = 0
        job.finished = time.perf_counter()

    def _step(self, slots: _Slots, buf: torch.Tensor, live: dict[int, _Job], isolate: bool = False) -> None:
        active = slots.active()
        k_votes = self.votes
        if self._fixed or active.size == buf.shape[0]:
            rows, batch = np.arange(buf.shape[0]), buf  # every slot; free ones are padding
        else:
            rows, batch = active, self._rows(buf, active)
        valid = slots.job[rows] >= 0
        n_pad = int(rows.size - valid.sum())
        seeds = None
        if self._stochastic:
            seeds = [derive_seed(self.run_seed, live[int(slots.job[s])].image_id, int(slots.copy[s]),
                                 int(slots.done[s]), REVERSE) if ok else None
                     for s, ok in zip(rows.tolist(), valid.tolist())]
        labels = self._batch_labels(batch, seeds)
        sl, lab = rows[valid], labels[valid]
        if (lab < 0).any():
            bad = sl[lab < 0]
            for u in np.unique(slots.job[bad]).tolist():
                job = live[u]
                js = sorted(int(slots.copy[s]) for s in bad if slots.job[s] == u)
                error = NonFiniteOutputError(
                    f"image {job.image_id!r}: {self.model_name} produced NaN/Inf logits "
                    f"(copies {js[0]}..{js[-1]}); check the checkpoint and the precision setting "
                    f"(try precision: fp32)")
                if not isolate:
                    raise error
                c = int((slots.job[sl] == u).sum())
                job.stats.unet_calls += c * self._calls_per_row
                job.stats.classifier_calls += c
                self._fail(job, slots, error)
            keep = slots.job[sl] >= 0  # the failed jobs' rows are closed now
            sl, lab = sl[keep], lab[keep]
            if not sl.size:
                return
        # Work done, per image (padding charged to the oldest image in the batch).
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        uids, per_job = np.unique(slots.job[sl], return_counts=True)
        for u, c in zip(uids.tolist(), per_job.tolist()):
            st = live[u].stats
            st.unet_calls += c * self._calls_per_row
            st.classifier_calls += c
            st.batches += 1
            st.seconds += elapsed * c / sl.size
        live[int(uids[0])].stats.rows_padded += n_pad
        # Vote bookkeeping, vectorized over the batch's rows.
        k = slots.done[sl]
        slots.counts[sl, lab] += 1
        slots.first[sl, lab] = np.minimum(slots.first[sl, lab], k)
        slots.done[sl] = k + 1
        leader, decided = majority_decided(slots.counts[sl], slots.first[sl], slots.done[sl], k_votes,
                                           self.early_exit)
        if decided.any():
            ds, lead = sl[decided], leader[decided]
            owner = slots.job[ds]
            now = time.perf_counter()
            for u in np.unique(owner).tolist():
                m = owner == u
                job = live[u]
                job.labels[slots.pos[ds[m]]] = lead[m]
                job.undecided -= int(m.sum())
                job.stats.votes_skipped += int((k_votes - slots.done[ds[m]]).sum())
                job.finished = now
            slots.close(ds)


# --------------------------------------------------------------------------- loading
_END = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate over ``items`` in a background thread, up to ``depth`` items ahead.

    Overlapped data loading: while the device certifies one image, the next ones are read and
    decoded (file and S3 reads, PIL and torch release the GIL). Order is kept; an exception in
    the loader is raised here, at the item where it happened. ``depth=0`` iterates inline.

    Example:
        >>> images = prefetch((rec.image_id, load_image(rec, ds)) for rec in records)
        >>> for res in sbc.certify_many(images, n0, n): ...
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, _END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((False, exc))

    thread = threading.Thread(target=work, name="densepure-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if ok:
                yield item
            elif item is _END:
                return
            else:
                raise item
    finally:
        stop.set()
