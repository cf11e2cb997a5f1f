"""scikit-learn's 8x8 handwritten digits as the project's embedded, offline data set.

Real images, no download: ``sklearn.datasets.load_digits`` reads 1,797 8x8 grayscale digits
(values 0..16, 10 classes) from a CSV inside the scikit-learn wheel. This module turns them into
the tensors the rest of the project expects:

- values / 16 -> [0, 1]; one channel (the data are grayscale: three identical channels would
  triple every UNet and classifier cost for no information);
- upsampled from 8x8 to ``image_size`` (default 16) with ``torch.nn.functional.interpolate``,
  ``mode="bilinear", align_corners=False, antialias=False``: each output pixel is a convex
  combination of input pixels, so values stay in [0, 1]. ``image_size=8`` returns the raw grid.
- a fixed, stratified split that depends on no library's RNG: within each class the images are
  ordered by the BLAKE2b hash of ``"densepure-digits-split-v1/" + id`` and the first
  ``round(0.25 * class size)`` form the test split (450 images), the rest the training split
  (1,347). The same ids land in the same split on every machine and every numpy/sklearn version.
- stable ids ``digits-<original index>`` (the row index in ``load_digits()``).

Check it with::

    .venv/bin/python -c "from densepure_core.data.digits import load_digits_split as l; s = l('test'); print(s.images.shape, s.ids[:3])"
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGITS_NUM_CLASSES",
    "DIGITS_IMAGE_SIZE",
    "DIGITS_TEST_FRACTION",
    "DigitsSplit",
    "digits_split_indices",
    "load_digits_split",
]

DIGITS_NUM_CLASSES = 10
DIGITS_IMAGE_SIZE = 16  # default: 2x upsampling; see docs/digits_models.md for why not 32
DIGITS_TEST_FRACTION = 0.25
_SPLIT_SALT = "densepure-digits-split-v1/"  # changing it changes the split: bump the version


@dataclass(frozen=True)
class DigitsSplit:
    """One split of the digits data.

    Attributes:
        images: float32 tensor ``[N, 1, H, W]`` in [0, 1] (``H = W = image_size``).
        labels: int64 tensor ``[N]``, classes 0..9.
        ids: ``N`` stable ids ``"digits-<original index>"``, in ascending original index.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits as (float32 [1797, 8, 8] in [0, 1], int64 [1797]); read once per process."""
    from sklearn.datasets import load_digits  # imported lazily: sklearn costs ~1 s to import

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _split_key(index: int) -> bytes:
    return hashlib.blake2b((_SPLIT_SALT + f"digits-{index}").encode(), digest_size=16).digest()


@lru_cache(maxsize=1)
def digits_split_indices() -> dict[str, np.ndarray]:
    """The fixed split as original indices: ``{"train": int64[1347], "test": int64[450], "all": int64[1797]}``.

    Stratified: each class contributes ``round(0.25 * n_class)`` test images, chosen by hash
    order (see the module docstring). Indices are sorted ascending.
    """
    _, labels = _raw()
    test: list[int] = []
    for c in range(DIGITS_NUM_CLASSES):
        members = np.flatnonzero(labels == c).tolist()
        members.sort(key=_split_key)
        test.extend(members[: int(round(DIGITS_TEST_FRACTION * len(members)))])
    test_idx = np.array(sorted(test), dtype=np.int64)
    all_idx = np.arange(len(labels), dtype=np.int64)
    train_idx = np.setdiff1d(all_idx, test_idx)
    for arr in (test_idx, train_idx, all_idx):
        arr.setflags(write=False)
    return {"train": train_idx, "test": test_idx, "all": all_idx}


@lru_cache(maxsize=8)
def _upsampled(image_size: int) -> torch.Tensor:
    images, _ = _raw()
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # [1797, 1, 8, 8]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=False)
    # bilinear weights are convex, but float rounding can step a hair outside [0, 1]
    return x.clamp_(0.0, 1.0).contiguous()


def load_digits_split(split: Literal["train", "test", "all"] = "test",
                      image_size: int = DIGITS_IMAGE_SIZE) -> DigitsSplit:
    """Load one split of the digits, upsampled to ``image_size``.

    Args:
        split: ``"train"`` (1,347 images), ``"test"`` (450) or ``"all"`` (1,797).
        image_size: output side length, >= 8 (8 = the original grid, no interpolation).

    Returns:
        :class:`DigitsSplit` with ``images`` float32 ``[N, 1, image_size, image_size]`` in [0, 1],
        ``labels`` int64 ``[N]`` and ``ids`` (fresh tensors: callers may modify them).

    Example:
        >>> s = load_digits_split("test")
        >>> s.images.shape, s.ids[0]
        (torch.Size([450, 1, 16, 16]), 'digits-7')
    """
    indices = digits_split_indices()
    if split not in indices:
        raise ValueError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8; downsampling would "
                         f"lose the data), got {image_size!r}")
    idx = indices[split]
    _, labels = _raw()
    images = _upsampled(image_size)[torch.from_numpy(idx.copy())]  # advanced indexing copies
    return DigitsSplit(images=images, labels=torch.from_numpy(labels[idx].copy()),
                       ids=[f"digits-{i}" for i in idx.tolist()])
