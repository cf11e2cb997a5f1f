"""Explicit, stable randomness: every draw is seeded by (run seed, image id, copy, vote, stream).

Counts must not depend on batch size, shard layout, worker count or device. So no draw ever
comes from global state or from a generator shared by several rows: each row of a batch owns
its stream, keyed by :func:`derive_seed`, and a row's noise is a pure function of its ids.

Two ways to turn a row's seed into Gaussian noise (``NOISE_DEVICES``):

- ``"cpu"`` (the default, portable): the row owns a CPU generator, numpy's Philox4x32-10 bit
  generator keyed by its full 63-bit seed (:class:`RowNoise`, :func:`gaussian_rows`), and draws
  float32 normals with numpy's ziggurat; draws are moved to the device afterwards.
  Identical on every machine and device, but one generator call per row per draw, on the
  CPU: for 256x256x3 images on a GPU that is ~0.2 M normals per row per reverse step.
  Stream version 2 (:data:`STREAM_VERSION`). Version 1 used ``torch.Generator.manual_seed``,
  whose CPU engine (mt19937) keeps only the low 32 bits of a seed: seeds that differed only
  above bit 31 gave identical noise (~1.4 colliding (copy, vote) streams per image at
  ImageNet's DensePure setting), which breaks the independence of the selection and
  estimation copies that the Clopper-Pearson bound assumes. The config hash carries the
  version, so an OUT written with version 1 is never resumed with version 2.
  On CUDA, draws go through pinned memory with a non-blocking copy (so the host does not
  wait for the GPU), and large draws fill rows on a thread pool (each row's generator is
  independent, so the values are the same as a serial fill).
- ``"device"`` (opt-in, fast on GPUs): counter-based Philox4x32-10 (Salmon et al., SC'11)
  evaluated with int64 tensor arithmetic on the model's device (:class:`CounterNoise`,
  :func:`counter_normal`): the key is the row's 63-bit seed, the counter is (element block,
  draw index), so every row and every draw is computed in one vectorized pass, with no host
  work and no per-row generator, and it can be captured in a CUDA graph. The integer stream is
  exact everywhere; the Box-Muller transform runs in float32 on the device, so values agree
  between CPU and GPU only to float rounding (and counts can differ in near-tie copies).
  Counts stay independent of batch size, order and worker count on a given device type.
  The two modes draw different noise: counts differ between ``"cpu"`` and ``"device"``.

Check the counter stream against Random123's known-answer vectors with::

    .venv/bin/python -m pytest -p no:cacheprovider tests/densepure_core/test_rng.py
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "STREAM_VERSION",
    "SMOOTH",
    "REVERSE",
    "NOISE_DEVICES",
    "derive_seed",
    "row_generator",
    "NoiseSource",
    "RowNoise",
    "StagedNoise",
    "gaussian_rows",
    "philox4x32",
    "counter_normal",
    "CounterNoise",
    "make_noise",
]

#: The version of the noise streams: part of every config hash (``CertifyConfig.vote_fields``),
#: so that votes drawn with another version are never mixed with these. 2: full-seed keys.
STREAM_VERSION = 2

SMOOTH = "smooth"  # the Gaussian smoothing noise of copy j (vote index -1)
REVERSE = "reverse"  # the reverse-process noise of copy j, vote k
NOISE_DEVICES = ("cpu", "device")

# Row fills above this many elements in one draw go to a thread pool (CUDA targets only:
# on a CPU device the threads would compete with the model's own intra-op threads).
_PARALLEL_MIN_ELEMENTS = 1 << 20
_POOL: ThreadPoolExecutor | None = None


def derive_seed(run_seed: int, image_id: str, copy_index: int, vote_index: int, stream: str) -> int:
    """A 63-bit seed from the ids of one draw (BLAKE2b, so nearby ids give unrelated seeds).

    Args:
        run_seed: the run's seed from the config.
        image_id: the image's stable id (a string: file path, manifest id, digits index).
        copy_index: j, the noisy copy (0..n0-1 selection, n0..n0+n-1 estimation).
        vote_index: k, the purification vote (-1 for the smoothing noise).
        stream: SMOOTH or REVERSE.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<qqq", int(run_seed), int(copy_index), int(vote_index)))
    h.update(stream.encode())
    h.update(b"\0")
    h.update(image_id.encode())
    return struct.unpack("<Q", h.digest())[0] >> 1


def _generator(seed: int) -> np.random.Generator:
    """The CPU stream of one row: Philox4x32-10 keyed by all 63 bits of ``seed``.

    (Not ``torch.Generator.manual_seed``: its CPU engine keeps only the low 32 bits.)
    """
    return np.random.Generator(np.random.Philox(key=int(seed)))


def row_generator(seed: int) -> np.random.Generator:
    """The CPU stream of one row (:func:`_generator`), for draws other than normals (e.g. the
    uniform random start of an attack)."""
    return _generator(seed)


def _host_buffer(shape: Sequence[int], device: torch.device, zero: bool) -> torch.Tensor:
    """A float32 CPU tensor to draw into; pinned when it is headed for a CUDA device."""
    pin = device.type == "cuda"
    make = torch.zeros if zero else torch.empty
    return make(tuple(shape), dtype=torch.float32, pin_memory=pin)


def _fill_rows(generators: Sequence[np.random.Generator | None], shape: tuple[int, ...],
               out: torch.Tensor, parallel: bool) -> None:
    """out[i] <- the next ``shape`` float32 normals of generators[i]; rows with no generator
    are left alone. ``out`` is a float32 CPU tensor ``[len(generators), *shape]``."""
    host = out.numpy()
    jobs = [(i, g) for i, g in enumerate(generators) if g is not None]
    if parallel and len(jobs) > 1 and out.numel() >= _PARALLEL_MIN_ELEMENTS:
        global _POOL
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()),
                                       thread_name_prefix="densepure-rng")
        # numpy releases the GIL while it fills, and each row has its own generator: same
        # values as serial.
        list(_POOL.map(lambda ig: ig[1].standard_normal(shape, dtype=np.float32, out=host[ig[0]]), jobs))
        return
    for i, g in jobs:
        g.standard_normal(shape, dtype=np.float32, out=host[i])


def _to_target(host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Pinned + non_blocking: the host queues the copy and goes on (no wait for the GPU).
    return host.to(device=device, dtype=dtype, non_blocking=host.is_pinned())


def gaussian_rows(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, *, noise_device: str = "cpu") -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed, stacked: ``[len(seeds), *shape]``.

    Args:
        seeds: one seed per row (:func:`derive_seed`).
        shape: the shape of one row, e.g. ``(C, H, W)``.
        device, dtype: where and in which dtype the result lives.
        noise_device: ``"cpu"``: row i is drawn from a fresh CPU generator seeded by
            ``seeds[i]``, whatever the batch (bit-identical on every device); ``"device"``:
            row i is draw 0 of the counter stream keyed by ``seeds[i]``, computed on ``device``
            (see :func:`counter_normal`).
    """
    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    if noise_device == "device":
        return CounterNoise(seeds, shape, device=device, dtype=dtype).draw()
    _check_noise_device(noise_device)
    out = _host_buffer((len(seeds), *shape), device, zero=False)
    _fill_rows([_generator(s) for s in seeds], shape, out, parallel=device.type == "cuda")
    return _to_target(out, device, dtype)


def _check_noise_device(noise_device: str) -> None:
    if noise_device not in NOISE_DEVICES:
        raise ValueError(f"noise_device={noise_device!r}: expected one of {NOISE_DEVICES}")


@runtime_checkable
class NoiseSource(Protocol):
    """Per-row reverse-process noise for one batch (RowNoise, CounterNoise, StagedNoise).

    The contract (``tests/densepure_core/test_rng.py::test_noise_source_contract``): ``draw()``
    returns ``[len(self), *shape]``; its t-th call gives row i the t-th draw of row i's stream,
    which depends only on that row's seed (never on the other rows, their order or the batch
    size); rows without a stream (padding) are zero.
    """

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def draw(self) -> torch.Tensor: ...


class RowNoise:
    """Per-row noise streams for a batch: row i draws step after step from its own generator.

    ``draw()`` returns ``[B, *shape]``; the t-th call gives every row its t-th draw. Padding
    rows (seed None) get zeros and consume nothing.

    Example:
        >>> noise = RowNoise([derive_seed(0, "img", 3, 1, REVERSE)], (1, 8, 8))
        >>> noise.draw().shape
        torch.Size([1, 1, 8, 8])
    """

    def __init__(self, seeds: Sequence[int | None], shape: Sequence[int],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self._generators = [None if s is None else _generator(s) for s in seeds]

    def __len__(self) -> int:
        return len(self._generators)

    def draw(self) -> torch.Tensor:
        """The next draw of every row: ``[B, *shape]`` on ``device`` in ``dtype``."""
        out = _host_buffer((len(self._generators), *self.shape), self.device, zero=True)
        _fill_rows(self._generators, self.shape, out, parallel=self.device.type == "cuda")
        return _to_target(out, self.device, self.dtype)

    def draw_into(self, out: torch.Tensor) -> None:
        """The next draw of every row written into ``out``, a float32 CPU tensor ``[B, *shape]``.

        Padding rows are zeroed. Used to stage several draws in one pinned buffer (CUDA graphs).
        """
        if out.device.type != "cpu" or out.dtype != torch.float32 or tuple(out.shape) != (len(self), *self.shape):
            raise ValueError(f"draw_into needs a float32 CPU tensor {[len(self), *self.shape]}, got "
                             f"{out.dtype} {list(out.shape)} on {out.device}")
        for i, g in enumerate(self._generators):
            if g is None:
                out[i].zero_()
        _fill_rows(self._generators, self.shape, out, parallel=self.device.type == "cuda")


# --------------------------------------------------------------------------- counter-based
_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # Random123's multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a * b, for b int64 in [0, 2^32).

    int64 tensors cannot hold a 64-bit unsigned product, so a is split into 16-bit halves:
    every partial product stays below 2^48 and nothing overflows (no reliance on wrap-around).
    """
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)  # product = p_hi * 2^16 + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor],
               rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-R (Random123's ``philox4x32_R``) on int64 tensors holding 32-bit words.

    Args:
        counter: four int64 tensors (broadcastable) with values in [0, 2^32).
        key: two int64 tensors (broadcastable with the counter) with values in [0, 2^32).
        rounds: 10 for the standard generator (the known-answer vectors are for 10).

    Returns:
        Four int64 tensors in [0, 2^32), the broadcast shape of the inputs.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def counter_normal(keys: torch.Tensor, draw: int, numel: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals ``[B, numel]`` from the counter stream: row b, draw ``draw``.

    Element i of row b comes from Philox4x32-10 with key (seed_b mod 2^32, seed_b >> 32) and
    counter (i // 4, 0, draw, 0); each 4-word block gives 4 normals by Box-Muller on 24-bit
    uniforms, computed in float32 on ``keys.device``. A row's values depend only on its seed,
    ``draw`` and ``numel`` (never on the batch, its order or its size), and the first m
    elements of a longer draw equal a draw of m elements.

    Args:
        keys: int64 ``[B]`` on the target device, the rows' 63-bit seeds.
        draw: the draw index t >= 0 (the t-th draw of the row's stream).
        numel: elements per row.
        dtype: result dtype.
    """
    if keys.dtype != torch.int64 or keys.ndim != 1:
        raise ValueError(f"keys must be int64 [B], got {keys.dtype} {list(keys.shape)}")
    if not 0 <= int(draw) <= _MASK32:
        raise ValueError(f"draw index {draw} outside 0..2^32-1")
    blocks = (int(numel) + 3) // 4
    dev = keys.device
    k = keys.view(-1, 1)
    block = torch.arange(blocks, device=dev, dtype=torch.int64).view(1, -1)
    zero = torch.zeros((), device=dev, dtype=torch.int64)
    w0, w1, w2, w3 = philox4x32(
        (block & _MASK32, (block >> 32) & _MASK32, zero + int(draw), zero),
        (k & _MASK32, (k >> 32) & _MASK32))
    scale = 2.0 ** -24
    # u1 in (0, 1] (log never sees 0), u2 in [0, 1): the top 24 bits, exact in float32.
    u1a = ((w0 >> 8) + 1).to(torch.float32) * scale
    u2a = (w1 >> 8).to(torch.float32) * scale
    u1b = ((w2 >> 8) + 1).to(torch.float32) * scale
    u2b = (w3 >> 8).to(torch.float32) * scale
    ra = torch.sqrt(-2.0 * torch.log(u1a))
    rb = torch.sqrt(-2.0 * torch.log(u1b))
    ta = (2.0 * math.pi) * u2a
    tb = (2.0 * math.pi) * u2b
    z = torch.stack((ra * torch.cos(ta), ra * torch.sin(ta), rb * torch.cos(tb), rb * torch.sin(tb)), dim=-1)
    return z.reshape(keys.shape[0], 4 * blocks)[:, :numel].to(dtype)


def _keys_tensor(seeds: Sequence[int | None], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 keys [B], bool valid [B]) on ``device``; padding rows (None) get key 0."""
    host_keys = torch.tensor([0 if s is None else int(s) for s in seeds], dtype=torch.int64)
    host_valid = torch.tensor([s is not None for s in seeds], dtype=torch.bool)
    if device.type == "cuda":
        host_keys, host_valid = host_keys.pin_memory(), host_valid.pin_memory()
    return (host_keys.to(device, non_blocking=host_keys.is_pinned()),
            host_valid.to(device, non_blocking=host_valid.is_pinned()))


class CounterNoise:
    """Counter-based per-row noise on the device: the drop-in for :class:`RowNoise`.

    ``draw()`` returns ``[B, *shape]``; the t-th call gives every row draw t of its counter
    stream (:func:`counter_normal`). Padding rows (seed None) get zeros. Everything after the
    construction runs on the device with no host synchronization (capturable in a CUDA graph
    when built with :meth:`from_tensors` on static tensors).

    Example:
        >>> noise = CounterNoise([derive_seed(0, "img", 3, 1, REVERSE)], (1, 8, 8))
        >>> noise.draw().shape
        torch.Size([1, 1, 8, 8])
    """

    def __init__(self, seeds: Sequence[int | None], shape: Sequence[int],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        device = torch.device(device)
        keys, valid = _keys_tensor(seeds, device)
        self._init(keys, valid, shape, dtype)

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, valid: torch.Tensor, shape: Sequence[int],
                     dtype: torch.dtype = torch.float32) -> "CounterNoise":
        """Noise for rows given as device tensors: int64 keys ``[B]`` and bool valid ``[B]``."""
        self = cls.__new__(cls)
        self._init(keys, valid, shape, dtype)
        return self

    def _init(self, keys, valid, shape, dtype) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.device = keys.device
        self.dtype = dtype
        self._keys = keys
        self._valid = valid.view(-1, *([1] * len(self.shape)))
        self._numel = math.prod(self.shape)
        self._t = 0

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def draw(self) -> torch.Tensor:
        """The next draw of every row: ``[B, *shape]`` on the keys' device in ``dtype``."""
        z = counter_normal(self._keys, self._t, self._numel, torch.float32)
        self._t += 1
        z = z.view(len(self), *self.shape) * self._valid
        return z.to(self.dtype)


class StagedNoise:
    """Draws made ahead into one tensor ``[draws, B, *shape]``; the t-th ``draw()`` returns slice t.

    For a captured CUDA graph, whose noise input must be a fixed device buffer: the rows'
    streams are drawn into it before each replay (``RowNoise.draw_into``).
    """

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


def make_noise(seeds: Sequence[int | None], shape: Sequence[int], device: torch.device | str,
               dtype: torch.dtype = torch.float32, *, noise_device: str = "cpu"):
    """The per-row reverse-noise source of a batch: :class:`RowNoise` or :class:`CounterNoise`."""
    _check_noise_device(noise_device)
    cls = CounterNoise if noise_device == "device" else RowNoise
    return cls(seeds, shape, device=device, dtype=dtype)
