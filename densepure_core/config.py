"""The one typed configuration of a certification job, validated once at the edge.

A job is: a dataset and which images of it, a diffusion model, a classifier, one or more
methods (``rs``: plain randomized smoothing; ``dds``: one-shot denoising, Carlini et al.;
``densepure``: K reverse runs of S steps and a majority vote), the sigmas, Cohen's n0/n/alpha,
and operational settings (batch size, shard size, device, precision, output location).

Configs are YAML files (``configs/*.yaml``); ``--set key=value`` overrides any field by its
dotted path (``--set n=500``, ``--set methods.1.k=5``, ``--set sigmas=[0.25,0.5]``), values
parsed as YAML. Every invalid value is refused with a message that names the field.

Sources of models may use the prefix ``bundled:`` for the models this project ships in
``densepure_core/assets`` (``bundled:digits/ddpm``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ASSETS_DIR",
    "ConfigError",
    "DatasetConfig",
    "DiffusionConfig",
    "ClassifierConfig",
    "MethodConfig",
    "CertifyConfig",
    "load_config",
    "apply_overrides",
    "resolve_source",
    "DEFAULT_RADII",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Cohen et al.'s grid, extended to 4.0 (the cap at n = 10^5 is 3.81 sigma).
DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0]

MethodKind = Literal["rs", "dds", "densepure"]


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_CREDENTIALS_IN_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]+@")


def _no_credentials(value: str | None) -> str | None:
    """Refuse ``scheme://user:secret@host/...``: configs are written next to results."""
    if value and _CREDENTIALS_IN_URI.match(value):
        raise ValueError("credentials must not be embedded in a URI (the config is written to OUT); "
                         "use the AWS environment or credential files instead")
    return value


class DatasetConfig(_Strict):
    """Which images to certify.

    ``kind``: ``digits`` (scikit-learn's digits, bundled), ``imagefolder`` (class
    sub-folders, ImageNet val layout; local or s3://), ``manifest`` (Parquet/CSV with columns
    image_id, uri, label). Images are chosen as the papers do: every ``every``-th image starting
    at ``start``, at most ``max_images`` (ImageNet val: every=500 gives 100 images).
    """

    kind: Literal["digits", "imagefolder", "manifest"] = "digits"
    path: str | None = Field(None, description="ImageFolder root or manifest file")
    split: Literal["train", "test", "all"] = "test"
    image_size: int | None = Field(None, gt=0, description="square size images are resized/cropped to")
    every: int = Field(1, ge=1)
    start: int = Field(0, ge=0)
    max_images: int | None = Field(None, ge=1)
    classes_file: str | None = Field(None, description="one class folder name per line, in label order")

    _path_creds = field_validator("path", "classes_file")(_no_credentials)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.kind != "digits" and not self.path:
            raise ValueError(f"dataset.path is required for dataset.kind={self.kind!r}")
        return self


class DiffusionConfig(_Strict):
    """A diffusers UNet2DModel + scheduler: local dir, s3:// URI, hub id or bundled:NAME."""

    source: str

    _source_creds = field_validator("source")(_no_credentials)


class ClassifierConfig(_Strict):
    """A timm classifier: a timm name, hf-hub:, local-dir:, a checkpoint file or bundled:NAME.

    ``source`` may contain ``{sigma}`` (e.g. noise-trained classifiers for Cohen's baseline).
    Preprocessing comes from timm's pretrained config unless set here.
    """

    source: str
    model_name: str | None = None
    num_classes: int | None = Field(None, ge=2)
    input_size: int | None = Field(None, gt=0)
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    _source_creds = field_validator("source")(_no_credentials)

    def for_sigma(self, sigma: float) -> "ClassifierConfig":
        return self.model_copy(update={"source": self.source.replace("{sigma}", repr(float(sigma)))})


class MethodConfig(_Strict):
    """One certification method; each (sigma, method) pair is its own output partition.

    ``k``: DensePure's reverse runs (votes) per noisy copy; ``steps``: S reverse steps.
    ``rs`` and ``dds`` are deterministic given the noisy copy, so k and steps must be 1.
    """

    kind: MethodKind
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    k: int = Field(1, ge=1)
    steps: int = Field(1, ge=1)
    classifier: ClassifierConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("rs", "dds") and (self.k != 1 or self.steps != 1):
            raise ValueError(f"method {self.kind!r} is deterministic per noisy copy: k and steps must be 1 "
                             f"(got k={self.k}, steps={self.steps}); use kind 'densepure' for votes")
        return self

    @property
    def label(self) -> str:
        """The partition name: ``name`` if given, else derived from kind, k and steps."""
        if self.name:
            return self.name
        if self.kind == "densepure":
            return f"densepure-k{self.k}-s{self.steps}"
        return self.kind


class CertifyConfig(_Strict):
    """A whole certification job. Written, resolved, next to every result (OUT/config.yaml)."""

    run_name: str = "default"
    dataset: DatasetConfig = DatasetConfig()
    diffusion: DiffusionConfig | None = None
    classifier: ClassifierConfig
    methods: list[MethodConfig] = Field(..., min_length=1)
    sigmas: list[float] = Field(..., min_length=1)
    n0: int = Field(100, ge=1)
    n: int = Field(10_000, ge=1)
    alpha: float = Field(0.001, gt=0.0, lt=1.0)
    radii: list[float] = Field(default_factory=lambda: list(DEFAULT_RADII))
    batch_size: int = Field(256, ge=1)
    seed: int = Field(0, ge=0)
    out: str = "results/default"
    shard_size: int = Field(16, ge=1)
    workers: int | None = Field(None, ge=1, description="Ray actors; default one per GPU, else 1")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    t_star_rule: Literal["nearest", "first_at_or_above"] = "nearest"
    early_exit: bool = True
    pad_batches: bool = False
    channels_last: bool = Field(False, description="GPU: NHWC memory format for both models (densepure_core.accel)")
    compile: bool = Field(False, description="GPU: torch.compile both models; the first batch of each shape compiles")
    cuda_graphs: bool = Field(False, description="GPU: capture the fixed-shape purify+classify step once and replay "
                                                 "it per batch (CUDA only; implies padded batches)")
    noise_device: Literal["cpu", "device"] = Field(
        "cpu", description="cpu: per-row CPU generators, identical counts on every device; device: counter-based "
                           "Philox on the model's device (fast on GPUs; other counts, see densepure_core/rng.py)")
    prefetch: int = Field(2, ge=0, description="images loaded ahead in a background thread (0: inline)")
    allow_pickle: bool = False
    on_bad_input: Literal["fail", "quarantine"] = Field(
        "fail", description="fail: stop cleanly at the first bad image (finished shards are kept); "
                            "quarantine: record it in the errors table and go on")

    _out_creds = field_validator("out")(_no_credentials)

    @field_validator("sigmas")
    @classmethod
    def _sigmas_positive(cls, v: list[float]) -> list[float]:
        for s in v:
            if not s > 0:
                raise ValueError(f"every sigma must be > 0 (got {s})")
        if len(set(v)) != len(v):
            raise ValueError(f"sigmas must be distinct (got {v})")
        return v

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: list[float]) -> list[float]:
        if any(r < 0 for r in v) or sorted(v) != v:
            raise ValueError(f"radii must be non-negative and ascending (got {v})")
        return v

    @model_validator(mode="after")
    def _methods(self):
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"methods must have distinct names; repeated: {dup} (set methods[i].name)")
        if self.diffusion is None and any(m.kind != "rs" for m in self.methods):
            raise ValueError("diffusion.source is required for methods 'dds' and 'densepure'")
        return self

    # -- derived --------------------------------------------------------------------------
    def classifier_for(self, method: MethodConfig, sigma: float) -> ClassifierConfig:
        return (method.classifier or self.classifier).for_sigma(sigma)

    def vote_fields(self) -> dict[str, Any]:
        """The fields that determine vote counts (not alpha, radii or operational settings)."""
        fields = self.model_dump(mode="json", include={
            "dataset", "diffusion", "classifier", "methods", "sigmas", "n0", "n", "seed",
            "precision", "t_star_rule", "shard_size",
        })
        # The device noise stream gives other counts; the default CPU stream is the one every
        # earlier result used, so it is left out and their hashes stay valid.
        if self.noise_device != "cpu":
            fields["noise_device"] = self.noise_device
        return fields

    def config_hash(self) -> str:
        """sha256 (first 16 hex digits) of :meth:`vote_fields`: equal hashes, equal counts."""
        blob = json.dumps(self.vote_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def resolve_source(source: str) -> str:
    """Expand ``bundled:NAME`` (keeping any ``local-dir:`` prefix) to the shipped asset path."""
    prefix = ""
    if source.startswith("local-dir:"):
        prefix, source = "local-dir:", source[len("local-dir:"):]
    if source.startswith("bundled:"):
        return prefix + str(ASSETS_DIR / source[len("bundled:"):])
    return prefix + source


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set n=500")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from exc
        try:
            _set_path(data, key.strip(), value)
        except (IndexError, ValueError, TypeError) as exc:
            raise ConfigError(f"--set {key}: no such field path in the config") from exc
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> CertifyConfig:
    """Read YAML (or take ``data``), apply overrides, validate. Raises ConfigError."""
    origin = str(path) if path else "<dict>"
    if data is None:
        if path is None:
            raise ConfigError("no config given")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    data = apply_overrides(json.loads(json.dumps(data)), overrides or [])
    try:
        return CertifyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None
