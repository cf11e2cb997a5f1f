"""The one typed configuration of a certification job, validated once at the edge.

A job is: a dataset and which images of it, a diffusion model, a classifier, one or more
methods (``rs``: plain randomized smoothing; ``dds``: one-shot denoising, Carlini et al.;
``densepure``: K reverse runs of S steps and a majority vote), the sigmas, Cohen's n0/n/alpha,
and operational settings (batch size, shard size, device, precision, output location).

Configs are YAML files; the presets ship in the package (``densepure_core/config/presets/*.yaml``,
named ``default``, ``imagenet_dds``, ...: :func:`packaged_config`). ``--set key=value`` overrides any field by its
dotted path (``--set n=500``, ``--set methods.1.k=5``, ``--set sigmas=[0.25,0.5]``), values
parsed as YAML. Every invalid value is refused with a message that names the field.

Sources of models may use the prefix ``bundled:`` for the models this project ships in
``densepure_core/assets`` (``bundled:digits/ddpm``).
"""

from __future__ import annotations

import hashlib
import math
import importlib.resources
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python

__all__ = [
    "ASSETS_DIR",
    "PACKAGED_CONFIGS",
    "packaged_config",
    "resolve_config_path",
    "ConfigError",
    "DatasetConfig",
    "DiffusionConfig",
    "ClassifierConfig",
    "MethodConfig",
    "AdaptiveConfig",
    "CertifyConfig",
    "load_config",
    "apply_overrides",
    "resolve_source",
    "DEFAULT_RADII",
    "votes",
    "operational",
    "determines_votes",
    "unclassified_fields",
]

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
#: The YAML presets shipped as package data (default, imagenet_dds, imagenet_densepure, ...).
PACKAGED_CONFIGS = importlib.resources.files("densepure_core.config") / "presets"
# Cohen et al.'s grid, extended to 4.0 (the cap at n = 10^5 is 3.81 sigma).
DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0]

MethodKind = Literal["rs", "dds", "densepure"]



# -- which fields determine the votes: declared on each field ----------------------------------

_VOTES_KEY = "votes"


_OMIT_NONE_KEY = "hash_omits_none"


def _classified(determines_votes: bool, default: Any, kwargs: dict[str, Any]) -> Any:
    extra = {_VOTES_KEY: determines_votes}
    if kwargs.pop("omit_none", False):  # a field added later: None keeps the hash it had before
        extra[_OMIT_NONE_KEY] = True
    if "default_factory" in kwargs:
        return Field(json_schema_extra=extra, **kwargs)
    return Field(default, json_schema_extra=extra, **kwargs)


def votes(default: Any = ..., **kwargs: Any) -> Any:
    """``Field(...)`` of a setting that changes vote counts: part of :meth:`CertifyConfig.config_hash`."""
    return _classified(True, default, kwargs)


def operational(default: Any = ..., **kwargs: Any) -> Any:
    """``Field(...)`` of a setting that changes no vote count (speed, placement, post-processing)."""
    return _classified(False, default, kwargs)


def determines_votes(model: type[BaseModel], name: str) -> bool | None:
    """The declaration of field ``name``: True (votes), False (operational), None (undeclared)."""
    extra = model.model_fields[name].json_schema_extra
    value = extra.get(_VOTES_KEY) if isinstance(extra, dict) else None
    return value if isinstance(value, bool) else None


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def unclassified_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``model`` (nested models included) declared neither
    :func:`votes` nor :func:`operational`."""
    missing = []
    for name, info in model.model_fields.items():
        if determines_votes(model, name) is None:
            missing.append(prefix + name)
        for sub in _nested_models(info.annotation):
            missing += unclassified_fields(sub, f"{prefix}{name}.")
    return missing


def _vote_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _vote_dump(value)
    if isinstance(value, (list, tuple)):
        return [_vote_value(v) for v in value]
    return to_jsonable_python(value)


def _vote_dump(model: BaseModel) -> dict[str, Any]:
    """The ``votes`` fields of ``model`` as JSON values, recursively (nested: their votes fields)."""
    fields = type(model).model_fields
    return {name: _vote_value(getattr(model, name))
            for name in fields if determines_votes(type(model), name)
            and not (getattr(model, name) is None and (fields[name].json_schema_extra or {}).get(_OMIT_NONE_KEY))}


def _stream_version() -> int:
    from densepure_core.rng import STREAM_VERSION  # imported here: rng imports torch

    return STREAM_VERSION


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _JobConfig(_Strict):
    """A job's whole config: hashed over :meth:`vote_fields` (defined by each job), written as YAML."""

    def vote_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def config_hash(self) -> str:
        """sha256 (first 16 hex digits) of :meth:`vote_fields`: equal hashes, equal results."""
        return hashlib.sha256(json.dumps(self.vote_fields(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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


class MethodConfig(_Strict):
    """One certification method; each (sigma, method) pair is its own output partition.

    ``k``: DensePure's reverse runs (votes) per noisy copy; ``steps``: S reverse steps.
    ``rs`` and ``dds`` are deterministic given the noisy copy, so k and steps must be 1.
    """

    kind: MethodKind = votes()
    # the partition name: renaming a method starts another partition
    name: str | None = votes(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    k: int = votes(1, ge=1)
    steps: int = votes(1, ge=1)
    classifier: ClassifierConfig | None = votes(None)

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("rs", "dds") and (self.k != 1 or self.steps != 1):
            raise ValueError(f"method {self.kind!r} is deterministic per noisy copy: k and steps must be 1 "
                             f"(got k={self.k}, steps={self.steps}); use kind 'densepure' for votes")
        if self.kind == "densepure" and self.steps == 1 and self.k > 1:
            raise ValueError(f"densepure with steps: 1 is one deterministic denoiser call per copy (DDS): its k = "
                             f"{self.k} votes would all agree; set steps >= 2 for a stochastic reverse process, "
                             f"or use kind 'dds'")
        return self

    @property
    def label(self) -> str:
        """The partition name: ``name`` if given, else derived from kind, k and steps."""
        if self.name:
            return self.name
        if self.kind == "densepure":
            return f"densepure-k{self.k}-s{self.steps}"
        return self.kind


class AdaptiveConfig(_Strict):
    """Settings of ``sampling: adaptive`` (docs/sequential.md; densepure_core/certification/sequential.py).

    ``bound``: the anytime-valid bound (``staged``: Clopper-Pearson at geometric looks with
    ``ratio``, alpha split ``split``; ``betabin``: Robbins' mixture with prior ``a``, ``b``,
    a look every ``batch``). ``batch``: estimation copies per look step (the first look).
    ``stop: false`` turns the stopping rule off (exactly n_max copies: fixed CERTIFY's counts).
    ``alpha`` and ``radii`` steer the stopping rule only (default: the run's ``alpha`` and
    ``radii``); they decide where an image stops, so they are part of an adaptive run's hash,
    but never the certificate's validity (re-certify at any alpha with ``densepure sql``).
    """

    bound: Literal["staged", "betabin"] = votes("staged")
    batch: int = votes(100, ge=1)
    ratio: float = votes(1.5, gt=1.0)
    split: Literal["equal", "late"] = votes("equal")
    a: float = votes(0.5, gt=0.0)
    b: float = votes(0.5, gt=0.0)
    stop: bool = votes(True)
    alpha: float | None = votes(None, gt=0.0, lt=1.0)
    radii: list[float] | None = votes(None)

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(r < 0 for r in v) or sorted(v) != v):
            raise ValueError(f"adaptive.radii must be non-empty, non-negative and ascending (got {v})")
        return v

    def bound_params(self, n_max: int) -> dict[str, Any]:
        """The bound's parameters as stored with the votes (``bound_params``)."""
        from densepure_core.certification.sequential import geometric_looks

        if self.bound == "betabin":
            return {"a": float(self.a), "b": float(self.b)}
        looks = geometric_looks(self.batch, n_max, self.ratio) if self.stop else (n_max,)
        return {"looks": [int(v) for v in looks], "split": self.split}

    def schedule(self, n_max: int) -> tuple[int, ...]:
        """The looks at which the rule is consulted (the last is n_max)."""
        from densepure_core.certification.sequential import batch_looks

        if not self.stop:
            return (int(n_max),)
        if self.bound == "betabin":
            return batch_looks(self.batch, n_max)
        return tuple(self.bound_params(n_max)["looks"])


class CertifyConfig(_Strict):
    """A whole certification job. Written, resolved, next to every result (OUT/config.yaml)."""

    # Each field is declared either votes(...) (it changes vote counts: part of config_hash, a
    # resumed OUT must agree on it) or operational(...) (it changes how or where the counts are
    # computed, or what is derived from them afterwards, never a count). tests/densepure_core/
    # test_config.py fails for any field declared with neither.
    run_name: str = operational("default", description="a label for run ids and logs")
    dataset: DatasetConfig = votes(DatasetConfig())
    diffusion: DiffusionConfig | None = votes(None)
    classifier: ClassifierConfig = votes()
    methods: list[MethodConfig] = votes(..., min_length=1)
    sigmas: list[float] = votes(..., min_length=1)
    n0: int = votes(100, ge=1)
    n: int = votes(10_000, ge=1)
    # sampling: fixed is Cohen's CERTIFY (n estimation copies); adaptive draws up to n_max
    # (default n) in looks and stops each image early (docs/sequential.md). For sampling: fixed
    # these three fields are left out of the hash (they change no vote), so hashes of fixed runs
    # are those of the releases before adaptive sampling existed.
    sampling: Literal["fixed", "adaptive"] = votes("fixed")
    n_max: int | None = votes(None, ge=1, description="adaptive: the most estimation copies (default n)")
    adaptive: AdaptiveConfig = votes(AdaptiveConfig())
    # alpha and radii are applied to the stored counts at aggregation (and can be changed later
    # with `densepure sql --alpha`): they never change a vote.
    alpha: float = operational(0.001, gt=0.0, lt=1.0)
    radii: list[float] = operational(default_factory=lambda: list(DEFAULT_RADII))
    # Every row draws from its own generators: batch size and worker count change no count.
    batch_size: int = operational(256, ge=1)
    seed: int = votes(0, ge=0)
    out: str = operational("results/default")
    # The shard layout is stored in run.json and in the vote file names; a resumed OUT must keep it.
    shard_size: int = votes(16, ge=1)
    workers: int | None = operational(None, ge=1, description="Ray actors; default one per GPU, else 1")
    device: str = operational("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    # Lower precision changes the models' outputs, hence the votes.
    precision: Literal["fp32", "bf16", "fp16"] = votes("fp32")
    t_star_rule: Literal["nearest", "first_at_or_above"] = votes("nearest")
    early_exit: bool = operational(True, description="skip DensePure votes that cannot change a copy's "
                                                     "label (exact: the same counts)")
    pad_batches: bool = operational(False)
    channels_last: bool = operational(False, description="GPU: NHWC memory format for both models "
                                                         "(densepure_core.models.accel)")
    compile: bool = operational(False, description="GPU: torch.compile both models; the first batch of each "
                                                   "shape compiles")
    cuda_graphs: bool = operational(False, description="GPU: capture the fixed-shape purify+classify step once "
                                                       "and replay it per batch (CUDA only; implies padded batches)")
    # The two noise streams draw different numbers: different counts.
    noise_device: Literal["cpu", "device"] = votes(
        "cpu", description="cpu: per-row CPU generators, identical counts on every device; device: counter-based "
                           "Philox on the model's device (fast on GPUs; other counts, see densepure_core/rng.py)")
    prefetch: int = operational(2, ge=0, description="images loaded ahead in a background thread (0: inline)")
    allow_pickle: bool = operational(False, description="accept pickle weights; the same weights give the "
                                                        "same counts in either format")
    on_bad_input: Literal["fail", "quarantine"] = operational(
        "fail", description="fail: stop cleanly at the first bad image (finished shards are kept); "
                            "quarantine: record it in the errors table and go on")

    _out_creds = field_validator("out")(_no_credentials)

    @field_validator("sigmas")
    @classmethod
    def _sigmas_positive(cls, v: list[float]) -> list[float]:
        for s in v:
            if not (s > 0 and math.isfinite(s)):
                raise ValueError(f"every sigma must be a finite number > 0 (got {s})")
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
    @property
    def budget(self) -> int:
        """The most estimation copies of an image: n (fixed) or n_max (adaptive, default n)."""
        return self.n if self.sampling == "fixed" or self.n_max is None else int(self.n_max)

    def stop_alpha(self) -> float:
        """The alpha the adaptive stopping rule uses (``adaptive.alpha``, default ``alpha``)."""
        return float(self.alpha if self.adaptive.alpha is None else self.adaptive.alpha)

    def stop_radii(self) -> list[float]:
        """The radius grid the adaptive stopping rule uses (``adaptive.radii``, default ``radii``)."""
        return list(self.radii if self.adaptive.radii is None else self.adaptive.radii)

    def classifier_for(self, method: MethodConfig, sigma: float) -> ClassifierConfig:
        return (method.classifier or self.classifier).for_sigma(sigma)

    def vote_fields(self) -> dict[str, Any]:
        """The hash payload: every field declared ``votes(...)`` (nested models: their ``votes``
        fields), JSON-compatible, plus ``stream_version``, the version of the noise streams
        (:data:`densepure_core.rng.STREAM_VERSION`; not a setting: the code's draws)."""
        return self._hash_payload(_stream_version())

    def config_hash(self, stream_version: int | None = None) -> str:
        """sha256 (first 16 hex digits) of :meth:`vote_fields`: equal hashes, equal counts.

        ``stream_version`` (default: the current one) gives the hash this config had under an
        older noise-stream version; version 1 is the payload of the releases before the
        stream version existed (no ``stream_version`` key, ``noise_device`` only when not
        ``cpu``), so an OUT they wrote can be recognised and refused (tasks/certify/plan.py).
        """
        payload = self._hash_payload(_stream_version() if stream_version is None else stream_version)
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _hash_payload(self, stream_version: int) -> dict[str, Any]:
        fields = _vote_dump(self)
        if self.sampling == "fixed":  # none of them changes a vote: the pre-adaptive payload
            for name in ("sampling", "n_max", "adaptive"):
                del fields[name]
        else:  # the stopping rule's alpha and grid decide where images stop: resolved here
            fields["n_max"] = self.budget
            fields["adaptive"]["alpha"] = self.stop_alpha()
            fields["adaptive"]["radii"] = [float(r) for r in self.stop_radii()]
        if stream_version == 1:
            if fields.get("noise_device") == "cpu":
                del fields["noise_device"]
        else:
            fields["stream_version"] = int(stream_version)
        return fields

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_UNDECLARED = unclassified_fields(CertifyConfig)
if _UNDECLARED:  # a developer error: every field must say whether it determines the votes
    raise TypeError(f"CertifyConfig fields declared neither votes(...) nor operational(...): {_UNDECLARED}")


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


def packaged_config(name: str):
    """The packaged preset ``name`` (``default``, ``imagenet_dds``; ``.yaml`` optional), read
    from the installed package (importlib.resources), never from a source tree. Raises
    ConfigError for an unknown name."""
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    resource = PACKAGED_CONFIGS / f"{stem}.yaml"
    if not resource.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in PACKAGED_CONFIGS.iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"no packaged config {name!r}; packaged: {', '.join(names)}")
    return resource


def resolve_config_path(path: str | Path):
    """A config file: ``path`` if it exists, else the packaged preset it names.

    ``default`` or ``imagenet_dds.yaml`` (a bare name) and ``configs/imagenet_dds.yaml`` (where
    the presets lived in the source tree before they became package data) name a packaged
    preset when no such file exists; anything else is returned as given.
    """
    if isinstance(path, (str, Path)):
        p = Path(path).expanduser()
        if p.exists():
            return p
        if p.parent in (Path("."), Path("configs")) and p.suffix in ("", ".yaml", ".yml"):
            try:
                return packaged_config(p.name)
            except ConfigError:
                pass
        return p
    return path  # an importlib.resources Traversable


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one
    silently, so a config with two ``n:`` lines would run with whichever came last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    f"keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


#: ``job:`` of a config -> (the command that runs it, what it is called in messages).
_JOB_COMMANDS = {"attack": ("densepure attack", "an attack evaluation"),
                 "train-addt": ("densepure train-addt", "an ADDT training")}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, model: type[BaseModel] | None = None) -> CertifyConfig:
    """Read YAML (or take ``data``), apply overrides, validate. Raises ConfigError.

    ``path``: a YAML file, or a packaged preset (:func:`resolve_config_path`). ``model``: the
    config type (default :class:`CertifyConfig`; ``densepure attack`` passes
    :class:`densepure_core.config.attack.AttackConfig`).
    """
    model = model or CertifyConfig
    origin = str(path) if path else "<dict>"
    if data is None:
        if path is None:
            raise ConfigError("no config given")
        try:
            data = yaml.load(resolve_config_path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"config {path} is a directory: pass a YAML file (e.g. {path}/config.yaml), or a "
                              f"packaged preset name") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): pass a YAML file, not a "
                              f"binary one") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a YAML {type(data).__name__}, not a mapping of fields "
                              f"(e.g. 'n: 500')")
    data = apply_overrides(json.loads(json.dumps(data)), overrides or [])
    if isinstance(data, dict):  # another job's config: say which command runs it
        job = data.get("job")
        wanted = model.model_fields["job"].default if "job" in model.model_fields else None
        if job != wanted and job in _JOB_COMMANDS:
            raise ConfigError(f"{origin} is {_JOB_COMMANDS[job][1]} config (job: {job}): run it with "
                              f"`{_JOB_COMMANDS[job][0]} --config {origin}`")
        if model is not CertifyConfig and job is None and "methods" in data:
            raise ConfigError(f"{origin} is a certification config (it has methods and no 'job:'): run it "
                              f"with `densepure certify --config {origin}`")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None
