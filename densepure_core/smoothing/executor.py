"""The engine's device side: the slot buffer, noise, purify + classify + argmax, CUDA graphs.

One host round trip per batch: the labels (int64 ``[B]``, -1 for a row with NaN/Inf logits)
come back for the vote bookkeeping (``scheduler.py``), nothing else. Noise, purification,
resize/normalize (``models.Classifier``) and argmax stay on the device.

Switches (``EngineOptions``; each checked against the default path in the tests):

- ``precision``: ``"bf16"`` / ``"fp16"`` autocast on the device (outputs within tolerance of fp32).
- ``channels_last``, ``compile``: ``accel.prepare_module`` on the UNet and the classifier
  (outputs equal to float rounding; compile takes tens of seconds per input shape; keep
  ``pad_batches`` on so there is one shape).
- ``cuda_graphs``: capture purify + classify + argmax for the fixed batch shape once and replay
  it for every batch (CUDA and a ``purify.Purifier`` only). Cuts the CPU launch cost of the S
  UNet calls, which matters for small models or small batches.
- ``noise_device``: ``"cpu"`` (per-row CPU generators) or ``"device"`` (counter-based Philox on
  the model's device); see ``rng.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch

from densepure_core.diffusion.purify import Purifier, UNetDenoiser
from densepure_core.rng import (REVERSE, SMOOTH, CounterNoise, RowNoise, StagedNoise, _keys_tensor, derive_seed,
                                gaussian_rows, make_noise)

from .options import EngineOptions
from .scheduler import ImageJob, RowIds

__all__ = ["DeviceExecutor"]


class DeviceExecutor:
    """Holds the models on their device and runs the batches a ``VoteScheduler`` asks for.

    Args:
        classifier: images in [0, 1] ``[B, C, H, W]`` -> logits ``[B, num_classes]``.
        purifier: a ``purify.PurifierProtocol``.
        sigma: the smoothing noise level (pixel units of [0, 1] images).
        run_seed: the run's seed: every draw is keyed by (run_seed, image id, copy, vote).
        options: the engine's options (``device`` must be resolved).
    """

    def __init__(self, classifier, purifier, sigma: float, run_seed: int, options: EngineOptions,
                 device: torch.device):
        self.options = options
        self.device = device
        self.sigma = float(sigma)
        self.run_seed = int(run_seed)
        if options.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device (got {device}); set cuda_graphs: false")
        if options.cuda_graphs and not isinstance(purifier, Purifier):
            raise ValueError(f"cuda_graphs needs a purify.Purifier (make_purifier); got {type(purifier).__name__}")
        if options.channels_last or options.compile:
            purifier, classifier = self._prepare(purifier, classifier)
        self.classifier = classifier
        self.purifier = purifier
        self.stochastic = bool(getattr(purifier, "stochastic", False))
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}  # per image shape: the slot rows
        self._graphs: dict[tuple[int, ...], _CudaGraphRunner] = {}
        self.buf: torch.Tensor | None = None

    # -- the Backend protocol -------------------------------------------------------------
    def use_shape(self, shape: tuple[int, ...]) -> None:
        buf = self._buffers.get(shape)
        if buf is None:
            buf = self._buffers[shape] = torch.zeros((self.options.batch_size, *shape), dtype=torch.float32,
                                                     device=self.device)
        self.buf = buf

    def open(self, job: ImageJob, slots: np.ndarray, copies: list[int]) -> None:
        """Draw the smoothing noise of ``copies`` and write x + sigma e into slot rows ``slots``."""
        seeds = [derive_seed(self.run_seed, job.image_id, j, -1, SMOOTH) for j in copies]
        eps = gaussian_rows(seeds, tuple(job.image.shape), device=self.device, dtype=job.image.dtype,
                            noise_device=self.options.noise_device)
        rows = job.image.unsqueeze(0) + self.sigma * eps
        if slots[-1] - slots[0] + 1 == slots.size:
            self.buf[int(slots[0]):int(slots[-1]) + 1] = rows
        else:
            self.buf.index_copy_(0, self._device_index(slots), rows)

    def labels(self, rows: np.ndarray, ids: RowIds) -> np.ndarray:
        batch = self.buf if rows.size == self.buf.shape[0] else self._rows(rows)
        seeds = None
        if self.stochastic:
            seeds = [None if i is None else derive_seed(self.run_seed, i[0], i[1], i[2], REVERSE) for i in ids]
        if self.options.cuda_graphs:
            shape = tuple(batch.shape[1:])
            runner = self._graphs.get(shape)
            if runner is None or runner.buf is not batch:
                runner = self._graphs[shape] = _CudaGraphRunner(self, batch)
            out = runner.run(seeds)
        else:
            noise = None
            if self.stochastic:
                noise = make_noise(seeds, tuple(batch.shape[1:]), self.device, batch.dtype,
                                   noise_device=self.options.noise_device)
            out = self.compute(batch, noise)
        # The batch's one host synchronization: exact early exit needs the labels.
        return out.cpu().numpy()

    # -- one batch ------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, batch: torch.Tensor, noise) -> torch.Tensor:
        """Purify, classify, argmax on the device: int64 ``[B]``, -1 where a row's logits are not finite."""
        with self._autocast():
            # No clamp here: plain RS (the "none" purifier) classifies the unclipped x + sigma e,
            # as Cohen et al. do and as the noise-trained classifiers were trained; purifiers
            # clip their own output to the image range.
            logits = self.classifier(self.purifier(batch, noise))
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=1)
        return torch.where(finite, logits.argmax(dim=1), torch.full_like(finite, -1, dtype=torch.int64))

    def _autocast(self):
        precision = self.options.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        # The autocast weight-cast cache must be off while a CUDA graph is captured.
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=not self.options.cuda_graphs)

    def _device_index(self, idx: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _rows(self, idx: np.ndarray) -> torch.Tensor:
        """buf[idx] (a view when idx is one contiguous run)."""
        if idx[-1] - idx[0] + 1 == idx.size:
            return self.buf[int(idx[0]):int(idx[-1]) + 1]
        return self.buf.index_select(0, self._device_index(idx))

    # -- models ---------------------------------------------------------------------------
    def _prepare(self, purifier, classifier):
        from densepure_core.models.accel import prepare_module

        opts = self.options
        kw: dict[str, Any] = dict(channels_last=opts.channels_last, compile=opts.compile, device=self.device)
        if opts.compile_options:
            kw["compile_options"] = dict(opts.compile_options)
        if isinstance(classifier, torch.nn.Module):
            classifier = prepare_module(classifier, **kw)
        if isinstance(purifier, Purifier) and purifier.denoiser is not None:
            den = purifier.denoiser
            if isinstance(den, UNetDenoiser):
                den = UNetDenoiser(prepare_module(den.unet, **kw))
            elif isinstance(den, torch.nn.Module):
                den = prepare_module(den, **kw)
            purifier = dataclasses.replace(purifier, denoiser=den)
        return purifier, classifier


class _CudaGraphRunner:
    """purify + classify + argmax for one fixed batch buffer, captured once, replayed per batch.

    Static inputs: the slot buffer itself (rows are written into it in place), and the reverse
    noise: per-row Philox keys (``noise_device="device"``, generated inside the graph) or the
    staged CPU draws ``[draws, B, *shape]`` (``"cpu"``, copied in before each replay).
    """

    def __init__(self, ex: DeviceExecutor, buf: torch.Tensor):
        self.ex = ex
        self.buf = buf
        dev = buf.device
        bs, shape = buf.shape[0], tuple(buf.shape[1:])
        self.shape = shape
        self.draws = ex.purifier.draws if ex.stochastic else 0
        self.on_device = ex.options.noise_device == "device"
        if self.draws and self.on_device:
            self.keys = torch.zeros(bs, dtype=torch.int64, device=dev)
            self.valid = torch.zeros(bs, dtype=torch.bool, device=dev)
            make = lambda: CounterNoise.from_tensors(self.keys, self.valid, shape, buf.dtype)  # noqa: E731
        elif self.draws:
            self.z = torch.zeros((self.draws, bs, *shape), dtype=buf.dtype, device=dev)
            make = lambda: StagedNoise(self.z)  # noqa: E731
        else:
            make = lambda: None  # noqa: E731
        # Warm up on a side stream (cuDNN/cuBLAS handles, autotuning, torch.compile), then capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                ex.compute(buf, make())
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = ex.compute(buf, make())

    def run(self, seeds: list[int | None] | None) -> torch.Tensor:
        if self.draws and self.on_device:
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
