"""Explicit, stable randomness: every draw is seeded by (run seed, image id, copy, vote, stream).

Counts must not depend on batch size, shard layout, worker count or device. So no draw ever
comes from global state or from a generator shared by several rows: each row of a batch owns a
CPU ``torch.Generator`` seeded by :func:`derive_seed`, and its draws are moved to the device
afterwards. A row's noise is therefore a pure function of its ids.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

__all__ = ["SMOOTH", "REVERSE", "derive_seed", "RowNoise", "gaussian_rows"]

SMOOTH = "smooth"  # the Gaussian smoothing noise of copy j (vote index -1)
REVERSE = "reverse"  # the reverse-process noise of copy j, vote k


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


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def gaussian_rows(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed, stacked: ``[len(seeds), *shape]``.

    Row i is drawn from a fresh CPU generator seeded by ``seeds[i]``, whatever the batch.
    """
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, s in enumerate(seeds):
        torch.randn(tuple(shape), generator=_generator(s), out=out[i])
    return out.to(device=device, dtype=dtype)


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
        self.device = device
        self.dtype = dtype
        self._generators = [None if s is None else _generator(s) for s in seeds]

    def __len__(self) -> int:
        return len(self._generators)

    def draw(self) -> torch.Tensor:
        out = torch.zeros((len(self._generators), *self.shape), dtype=torch.float32)
        for i, g in enumerate(self._generators):
            if g is not None:
                torch.randn(self.shape, generator=g, out=out[i])
        return out.to(device=self.device, dtype=self.dtype)
