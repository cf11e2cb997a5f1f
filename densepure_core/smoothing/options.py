"""The engine's options: one object, validated once (see ``SmoothedBaseClassifier``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from densepure_core.rng import NOISE_DEVICES

__all__ = ["EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; none of these changes a count (up to float rounding of the models).

    Attributes:
        batch_size: image rows per model call.
        early_exit: skip votes that cannot change a copy's label (exact).
        pad_batches: pad every batch to ``batch_size`` rows (static shapes for compiled or
            graphed GPU models); padding rows are computed and discarded, never counted as calls.
        precision: "fp32", "bf16" or "fp16" (autocast on the device).
        device: where the rows live (None: the classifier's device).
        noise_device: "cpu" (per-row CPU generators; identical counts on every device) or
            "device" (counter-based Philox on ``device``; other counts, see ``rng.py``).
        channels_last: NHWC UNet and classifier (``accel.prepare_module``; in place).
        compile: ``torch.compile`` the UNet and the classifier.
        compile_options: keyword arguments for ``torch.compile``.
        cuda_graphs: capture and replay the fixed-shape purify + classify step (CUDA and a
            ``purify.Purifier`` only; implies padded batches).
        model_name: names the model in error messages.
    """

    batch_size: int = 256
    early_exit: bool = True
    pad_batches: bool = False
    precision: str = "fp32"
    device: Any = None
    noise_device: str = "cpu"
    channels_last: bool = False
    compile: bool = False
    compile_options: Mapping[str, Any] | None = field(default=None, hash=False)
    cuda_graphs: bool = False
    model_name: str = "model"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r}: expected 'fp32', 'bf16' or 'fp16'")
        if self.noise_device not in NOISE_DEVICES:
            raise ValueError(f"noise_device={self.noise_device!r}: expected one of {NOISE_DEVICES}")

    @property
    def fixed_shape(self) -> bool:
        """Every batch has ``batch_size`` rows (padding or CUDA graphs)."""
        return self.pad_batches or self.cuda_graphs

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "EngineOptions":
        """The options named like attributes of ``settings`` (e.g. a ``CertifyConfig``), then ``overrides``."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        values.update(overrides)
        return cls(**values)
