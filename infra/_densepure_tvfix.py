"""Make PyPI's CUDA-built torchvision importable next to a CPU-only torch.

PyPI's torchvision 0.28.0 is built against CUDA; with the CPU torch wheel, ``import
torchvision`` fails with ``operator torchvision::nms does not exist`` because its Python code
registers fake kernels for C++ operators whose schemas were never defined. timm imports
torchvision, and diffusers does too when it is installed, so nothing would import.

This module installs a ``sys.meta_path`` hook (from ``densepure_tvfix.pth`` in site-packages,
so it also applies inside Ray workers). The hook does nothing until ``torchvision`` is first
imported; then, and only when ``torch.version.cuda is None``, it defines the missing operator
schemas. The C++ kernels stay unavailable (nothing in densepure calls them). On a CUDA torch it
is a no-op. ``make setup`` installs it; see infra/README.md.
"""

import sys

_LIBRARY = None  # keep the torch.library.Library alive: the schemas vanish with it


def _define_missing_schemas() -> None:
    global _LIBRARY
    import torch

    if torch.version.cuda is not None or _LIBRARY is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (present: a matching torchvision build)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor"
    )
    _LIBRARY = lib


class _TorchvisionHook:
    """A meta-path finder that runs the fix once, just before torchvision is imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            try:
                _define_missing_schemas()
            except Exception:  # never break the import itself; torchvision reports its own error
                pass
        return None  # let the regular finders import the module


def install() -> None:
    if not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())
