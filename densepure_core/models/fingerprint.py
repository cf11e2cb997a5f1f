"""Hashes for run metadata: of a weights file's bytes, and of a model's weights."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from .classifier import Classifier
from .diffusion import DiffusionModel


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory for multi-GB weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(obj: Any) -> str:
    """Hex sha256 over a model's weights, independent of how they were stored.

    Hashes, for every state-dict entry in sorted key order, the key, dtype, shape and raw
    bytes. The same weights give the same fingerprint whether they came from safetensors, a
    ``.pth`` or S3; casting to another dtype changes it (the run used different numbers).

    Args:
        obj: a :class:`DiffusionModel` (its UNet), a :class:`Classifier` (the wrapped model,
            without the preprocessing buffers), any ``nn.Module`` or a state dict.

    Returns:
        64 hex characters.
    """
    if isinstance(obj, DiffusionModel):
        obj = obj.unet
    if isinstance(obj, Classifier):
        obj = obj.model
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(state, Mapping):
        raise TypeError(f"model_fingerprint: expected a module or state dict, got "
                        f"{type(obj).__name__}")
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
