"""The config sections every job shares: which images, which diffusion model, which classifier.

Sources of models may use the prefix ``bundled:`` for the models this project ships in
``densepure_core/assets`` (``bundled:digits/ddpm``): :func:`resolve_source` expands it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from densepure_core.config.fields import _no_credentials, _Strict, votes

__all__ = ["ASSETS_DIR", "DatasetConfig", "DiffusionConfig", "ClassifierConfig", "resolve_source"]

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


class DatasetConfig(_Strict):
    """Which images to certify.

    ``kind``: ``digits`` (scikit-learn's digits, bundled), ``imagefolder`` (class
    sub-folders, ImageNet val layout; local or s3://), ``manifest`` (Parquet/CSV with columns
    image_id, uri, label). Images are chosen as the papers do: every ``every``-th image starting
    at ``start``, at most ``max_images`` (ImageNet val: every=500 gives 100 images).
    """

    # Every dataset field chooses or transforms the images, hence the votes.
    kind: Literal["digits", "imagefolder", "manifest"] = votes("digits")
    path: str | None = votes(None, description="ImageFolder root or manifest file")
    split: Literal["train", "test", "all"] = votes("test")
    image_size: int | None = votes(None, gt=0, description="square size images are resized/cropped to")
    every: int = votes(1, ge=1)
    start: int = votes(0, ge=0)
    max_images: int | None = votes(None, ge=1)
    classes_file: str | None = votes(None, description="one class folder name per line, in label order")
    # Image files are read as RGB unless this says 1 (grayscale, Pillow's "L"): a 1-channel
    # diffusion model needs it. Digits are 1-channel whatever it says.
    channels: Literal[1, 3] | None = votes(None, omit_none=True,
                                           description="1: read image files as grayscale; 3 (default): RGB")

    _path_creds = field_validator("path", "classes_file")(_no_credentials)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.kind != "digits" and not self.path:
            raise ValueError(f"dataset.path is required for dataset.kind={self.kind!r}")
        return self


class DiffusionConfig(_Strict):
    """A diffusers UNet2DModel + scheduler: local dir, s3:// URI, hub id or bundled:NAME."""

    source: str = votes()

    _source_creds = field_validator("source")(_no_credentials)


class ClassifierConfig(_Strict):
    """A timm classifier: a timm name, hf-hub:, local-dir:, a checkpoint file or bundled:NAME.

    ``source`` may contain ``{sigma}`` (e.g. noise-trained classifiers for Cohen's baseline).
    Preprocessing comes from timm's pretrained config unless set here.
    """

    # Every classifier field changes the model or its preprocessing, hence the votes.
    source: str = votes()
    model_name: str | None = votes(None)
    num_classes: int | None = votes(None, ge=2)
    input_size: int | None = votes(None, gt=0)
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = votes(None)
    mean: tuple[float, ...] | None = votes(None)
    std: tuple[float, ...] | None = votes(None)

    _source_creds = field_validator("source")(_no_credentials)

    def for_sigma(self, sigma: float) -> "ClassifierConfig":
        return self.model_copy(update={"source": self.source.replace("{sigma}", repr(float(sigma)))})


def resolve_source(source: str) -> str:
    """Expand ``bundled:NAME`` (keeping any ``local-dir:`` prefix) to the shipped asset path."""
    prefix = ""
    if source.startswith("local-dir:"):
        prefix, source = "local-dir:", source[len("local-dir:"):]
    if source.startswith("bundled:"):
        return prefix + str(ASSETS_DIR / source[len("bundled:"):])
    return prefix + source

