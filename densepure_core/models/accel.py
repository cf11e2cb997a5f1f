"""GPU speed options for the two models of a run: channels_last memory format and torch.compile.

Both are off by default (and pointless on a CPU): ``prepare_module`` is the one place that
applies them, so a worker calls it once per loaded model. Mixed precision is not here: it is
``CertifyConfig.precision`` (autocast around the smoothing loop, ``smoothing.py``).

- ``channels_last``: convolution weights are stored NHWC and every 4-D tensor argument is
  converted on the way in (a forward pre-hook), so cuDNN/tensor cores run their NHWC kernels
  (ADM is conv-heavy: typically 10-30% faster under bf16/fp16 on recent NVIDIA GPUs). Outputs
  equal the default layout's to float rounding.
- ``compile``: ``torch.compile`` (TorchInductor by default). The first call per input shape
  compiles (tens of seconds for an ADM UNet); later calls reuse it. Batches of varying size
  recompile once and then run dynamic; ``pad_batches: true`` keeps every batch the same shape.
  The compiled module forwards attribute access (``.dtype``, ``.config``...) to the original.

Example::

    unet = prepare_module(dm.unet, channels_last=True, compile=True, device="cuda")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["prepare_module", "to_channels_last"]


def to_channels_last(x: Any) -> Any:
    """A 4-D tensor in ``torch.channels_last`` memory format; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _channels_last_inputs(module, args, kwargs):
    return (tuple(to_channels_last(a) for a in args),
            {k: to_channels_last(v) for k, v in kwargs.items()})


def prepare_module(module: torch.nn.Module, *, channels_last: bool, compile: bool,
                   device: torch.device | str | None = None,
                   compile_options: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Move ``module`` to ``device`` and apply the speed options; returns the module to call.

    Args:
        module: a model in eval mode (a diffusers ``UNet2DModel``, a timm model, any
            ``nn.Module``). Modified in place (device, memory format, a pre-hook).
        channels_last: store parameters NHWC and convert 4-D inputs ``[B, C, H, W]`` to
            channels_last before every forward. Values are unchanged; only the layout differs.
        compile: wrap with ``torch.compile``. The returned ``OptimizedModule`` shares the
            parameters and forwards attribute access to ``module``.
        device: where the module goes (None: stays where it is).
        compile_options: keyword arguments for ``torch.compile`` (e.g. ``{"mode":
            "max-autotune"}``, or ``{"backend": "eager"}`` to check tracing without codegen).

    Returns:
        ``module`` itself, or its compiled wrapper when ``compile``. Idempotent: preparing the
        same module again (or its compiled wrapper) returns the same object, so a worker may
        call it for every shard and still compile once.

    Raises:
        RuntimeError: ``compile`` on a torch without ``torch.compile`` (the message says to
            set ``compile: false``).
    """
    if isinstance(module, _optimized_module_type()):
        module = module._orig_mod  # prepare the original; compile it again only if asked
    if device is not None:
        module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        if not getattr(module, "_densepure_channels_last", False):
            module.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True)
            module._densepure_channels_last = True
    if compile:
        if not hasattr(torch, "compile"):
            raise RuntimeError(f"compile=True needs torch.compile (torch >= 2.0), this is torch "
                               f"{torch.__version__}; set compile: false")
        key = repr(sorted((compile_options or {}).items()))
        cached = module.__dict__.get("_densepure_compiled")
        if cached is not None and cached[0] == key:
            return cached[1]
        compiled = torch.compile(module, **dict(compile_options or {}))
        # In __dict__, not as a submodule: the wrapper holds the module, not the reverse.
        module.__dict__["_densepure_compiled"] = (key, compiled)
        return compiled
    return module


def _optimized_module_type() -> type:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover  (torch < 2.0)
        return type(None)
    return OptimizedModule
