"""The papers' models and run presets: where the weights come from, and ``models fetch``.

Two registries:

- ``MODEL_PRESETS``: one entry per model. Diffusion models are OpenAI's released ADM
  checkpoints (a URL, the raw file name, the flags in ``adm.ADM_PRESETS``); ``fetch`` downloads
  the raw ``.pt`` into ``CACHE/downloads/`` and converts it into ``CACHE/<name>/`` (``unet/`` +
  ``scheduler/``, what ``load_diffusion`` reads). Classifiers are timm models: one with hub
  weights is downloaded into the Hugging Face cache (``$HF_HOME``, where ``load_classifier``
  finds it by name, also offline); one without a public source says what file to put where.
- ``CONFIG_PRESETS``: the packaged YAML files (``densepure_core/config/presets/``) and the models each needs.

Offline (``HF_HUB_OFFLINE=1``, ``DENSEPURE_OFFLINE=1``, ``offline=True``, or no route to the
host) ``fetch`` downloads nothing: it converts what is already in ``CACHE/downloads/`` and
raises :class:`FetchError` listing, for every missing piece, the URL to download on a machine
that is online and the exact path to place it at.

Example::

    steps = fetch("imagenet_densepure", "models")   # ~2.2 GB download + conversion
    for s in steps:
        print(s.model, s.status, s.path)
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from densepure_core.models.adm import (
    ADM_PRESETS,
    AdmConfig,
    AdmConversionError,
    convert_adm_checkpoint,
)

__all__ = [
    "DEFAULT_CACHE",
    "CONFIGS_DIR",
    "DiffusionWeights",
    "ClassifierWeights",
    "ConfigPreset",
    "MODEL_PRESETS",
    "CONFIG_PRESETS",
    "FetchStep",
    "FetchError",
    "resolve_models",
    "is_offline",
    "fetch",
]

#: Where ``models fetch`` puts models by default (relative to the working directory, as the
#: presets' ``diffusion.source`` paths are): ``$DENSEPURE_MODELS`` or ``./models``.
DEFAULT_CACHE = os.environ.get("DENSEPURE_MODELS", "models")
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "config" / "presets"  # package data (config.PACKAGED_CONFIGS)


@dataclass(frozen=True)
class DiffusionWeights:
    """An OpenAI ADM checkpoint and how to convert it.

    Attributes:
        name: the preset name; also the converted folder ``CACHE/<name>``.
        description: what it is and who used it.
        url: the original download URL.
        filename: the raw checkpoint's file name (kept in ``CACHE/downloads/``).
        adm: the checkpoint's flags.
        size: approximate download size, for messages.
    """

    name: str
    description: str
    url: str
    filename: str
    adm: AdmConfig
    size: str

    def converted_dir(self, cache: Path) -> Path:
        return cache / self.name

    def raw_file(self, cache: Path) -> Path:
        return cache / "downloads" / self.filename


@dataclass(frozen=True)
class ClassifierWeights:
    """A timm classifier: from the hub (``timm_name``) or a file you provide (``filename``).

    Attributes:
        name: the preset name.
        description: what it is and who used it.
        timm_name: timm model name with pretrained tag whose weights timm downloads from the hub
            (None: no public timm weights).
        filename: for manual classifiers, the checkpoint file expected at ``CACHE/<filename>``.
        instructions: how to obtain the weights when they cannot be downloaded.
    """

    name: str
    description: str
    timm_name: str | None = None
    filename: str | None = None
    instructions: str = ""


@dataclass(frozen=True)
class ConfigPreset:
    """A packaged YAML file (``densepure_core/config/presets/``) and the models it needs."""

    name: str
    config: str
    models: tuple[str, ...]

    @property
    def path(self) -> Path:
        return CONFIGS_DIR / self.config


_TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion"

MODEL_PRESETS: dict[str, DiffusionWeights | ClassifierWeights] = {
    "imagenet256-uncond": DiffusionWeights(
        name="imagenet256-uncond",
        description="guided-diffusion's unconditional 256x256 ImageNet ADM (552.8M parameters; "
                    "Carlini et al.'s DDS and DensePure on ImageNet)",
        url=f"{_OPENAI}/jul-2021/256x256_diffusion_uncond.pt",
        filename="256x256_diffusion_uncond.pt",
        adm=ADM_PRESETS["imagenet256-uncond"], size="2.1 GB"),
    "cifar10-improved": DiffusionWeights(
        name="cifar10-improved",
        description="improved-diffusion's unconditional CIFAR-10 L_hybrid model, cosine schedule, "
                    "4000 steps (52.5M parameters; Carlini et al. and DensePure on CIFAR-10)",
        url=f"{_OPENAI}/march-2021/cifar10_uncond_50M_500K.pt",
        filename="cifar10_uncond_50M_500K.pt",
        adm=ADM_PRESETS["cifar10-improved"], size="210 MB"),
    "beit-large-512": ClassifierWeights(
        name="beit-large-512",
        description="timm BEiT-L/16 at 512x512, ImageNet-22k pretrained, fine-tuned on 22k then "
                    "1k (305.7M parameters; Carlini et al.'s `timm.create_model("
                    "'beit_large_patch16_512', pretrained=True)`)",
        timm_name="beit_large_patch16_512.in22k_ft_in22k_in1k"),
    "vit-b16-224-cifar10": ClassifierWeights(
        name="vit-b16-224-cifar10",
        description="ViT-B/16 at 224x224, ImageNet-21k pretrained, fine-tuned on CIFAR-10 "
                    "(the papers' CIFAR-10 classifier)",
        filename="cifar10-vit-b16-224.safetensors",
        instructions=(
            "no timm checkpoint of it is published. Fine-tune timm's "
            "`vit_base_patch16_224.augreg_in21k` on CIFAR-10 upsampled to 224x224 (bicubic, "
            "mean/std 0.5) as docs/models.md describes, or convert a checkpoint you have to "
            "timm's state-dict names, and save it with "
            "`safetensors.torch.save_file(model.state_dict(), PATH)`")),
}

CONFIG_PRESETS: dict[str, ConfigPreset] = {
    name: ConfigPreset(name, f"{name}.yaml", models)
    for name, models in (
        ("imagenet_densepure", ("imagenet256-uncond", "beit-large-512")),
        ("imagenet_dds", ("imagenet256-uncond", "beit-large-512")),
        ("cifar10_densepure", ("cifar10-improved", "vit-b16-224-cifar10")),
        ("cifar10_dds", ("cifar10-improved", "vit-b16-224-cifar10")),
    )
}


class FetchError(RuntimeError):
    """``fetch`` could not make every model of a preset available; the message says what to do."""


@dataclass
class FetchStep:
    """What ``fetch`` did for one model.

    ``status``: ``present`` (already converted/cached), ``converted`` (from a raw file already
    in ``downloads/``), ``fetched`` (downloaded, and converted for diffusion models),
    ``missing`` (needs a manual step or a download from an online machine; see ``message``).
    """

    model: str
    status: str
    path: str
    message: str = ""


def resolve_models(preset: str) -> list[str]:
    """Model preset names of a config preset (``imagenet_dds``, ``imagenet_dds.yaml``) or a
    model preset (``imagenet256-uncond``). Raises ValueError listing the known names."""
    key = Path(preset).name.removesuffix(".yaml").removesuffix(".yml")
    if key in CONFIG_PRESETS:
        return list(CONFIG_PRESETS[key].models)
    if key in MODEL_PRESETS:
        return [key]
    raise ValueError(f"unknown preset {preset!r}; config presets: {', '.join(CONFIG_PRESETS)}; "
                     f"model presets: {', '.join(MODEL_PRESETS)}")


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``DENSEPURE_OFFLINE`` is set to a true value."""
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "DENSEPURE_OFFLINE"))


def _urllib_download(url: str, dest: Path, log: Callable[[str], None]) -> None:
    """Stream ``url`` to ``dest`` through ``dest.part``; renamed only when complete."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            done, step = 0, 1 << 27
            while block := r.read(1 << 20):
                f.write(block)
                done += len(block)
                if done % step < len(block):
                    log(f"  {done >> 20} MiB" + (f" of {total >> 20} MiB" if total else ""))
        if total and part.stat().st_size != total:
            raise OSError(f"got {part.stat().st_size} bytes of {total}; retry")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _manual(model: str, path: Path, what: str) -> FetchStep:
    return FetchStep(model, "missing", str(path), what)


def fetch(preset: str, cache_dir: str | os.PathLike = DEFAULT_CACHE, *,
          offline: bool | None = None,
          download: Callable[[str, Path, Callable[[str], None]], None] | None = None,
          log: Callable[[str], None] = lambda m: None,
          registry: dict[str, DiffusionWeights | ClassifierWeights] | None = None,
          hub_cache: str | os.PathLike | None = None) -> list[FetchStep]:
    """Make every model of ``preset`` available locally; download only when online.

    Args:
        preset: a config preset (``imagenet_densepure``) or a model preset (``cifar10-improved``).
        cache_dir: the model cache (converted diffusion folders, ``downloads/``, manual files).
        offline: None: :func:`is_offline`; True: never touch the network.
        download: ``(url, dest, log)`` downloader (default: urllib, any http(s)/file URL).
        log: progress messages.
        registry: the model registry (default ``MODEL_PRESETS``; tests pass their own).
        hub_cache: the Hugging Face hub cache for timm weights (default: the hub's own,
            ``$HF_HOME/hub``, where ``load_classifier`` looks).

    Returns:
        One :class:`FetchStep` per model, all ``present``/``converted``/``fetched``.

    Raises:
        FetchError: some model is still missing; the message lists, per model, the URL or the
            manual step and the exact path to place the file at, then the command to rerun.
        ValueError: unknown preset.
    """
    registry = MODEL_PRESETS if registry is None else registry
    names = [preset] if preset in registry else resolve_models(preset)
    cache = Path(cache_dir).expanduser()
    offline = is_offline() if offline is None else offline
    download = download or _urllib_download
    hub_cache = None if hub_cache is None else str(hub_cache)
    steps = []
    for name in names:
        spec = registry[name]
        if isinstance(spec, DiffusionWeights):
            steps.append(_fetch_diffusion(spec, cache, offline, download, log))
        else:
            steps.append(_fetch_classifier(spec, cache, offline, log, hub_cache))
    missing = [s for s in steps if s.status == "missing"]
    if missing:
        lines = [f"{len(missing)} of {len(steps)} model(s) of {preset!r} are not available"
                 f"{' (offline)' if offline else ''}:"]
        lines += [f"  - {s.model}: {s.message}" for s in missing]
        lines.append(f"then rerun: densepure models fetch {preset} --cache {cache}")
        raise FetchError("\n".join(lines))
    return steps


def _diffusion_ready(folder: Path) -> bool:
    return (folder / "unet" / "config.json").is_file() and \
        (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file() and \
        (folder / "scheduler" / "scheduler_config.json").is_file()


def _fetch_diffusion(spec: DiffusionWeights, cache: Path, offline: bool, download,
                     log) -> FetchStep:
    out, raw = spec.converted_dir(cache), spec.raw_file(cache)
    if _diffusion_ready(out):
        return FetchStep(spec.name, "present", str(out))
    status = "converted"
    if not raw.is_file():
        place = (f"download {spec.url} ({spec.size}) on a machine that is online and place it "
                 f"at {raw}")
        if offline:
            return _manual(spec.name, raw, place)
        log(f"{spec.name}: downloading {spec.url} -> {raw}")
        try:
            download(spec.url, raw, log)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            return _manual(spec.name, raw, f"download failed ({type(e).__name__}: {e}); {place}")
        status = "fetched"
    log(f"{spec.name}: converting {raw} -> {out}")
    try:
        convert_adm_checkpoint(raw, out, spec.adm, overwrite=True)
    except AdmConversionError as e:
        return _manual(spec.name, raw, f"{raw} is not a usable copy of {spec.url} ({e}); delete "
                                       f"it and download it again")
    return FetchStep(spec.name, status, str(out))


def _fetch_classifier(spec: ClassifierWeights, cache: Path, offline: bool, log,
                      hub_cache: str | None) -> FetchStep:
    if spec.timm_name is None:
        dest = cache / str(spec.filename)
        if dest.is_file():
            return FetchStep(spec.name, "present", str(dest))
        return _manual(spec.name, dest, f"{spec.instructions}; place the file at {dest}")
    import timm
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id
    for fname in _TIMM_WEIGHT_FILES:  # what timm's pretrained loader reads, safetensors first
        cached = try_to_load_from_cache(repo, fname, cache_dir=hub_cache)
        if isinstance(cached, str):
            return FetchStep(spec.name, "present", cached)
    where = hub_cache or "the Hugging Face cache ($HF_HOME/hub)"
    place = (f"timm weights {spec.timm_name!r} (hub repo {repo}) are not in {where}: run "
             f"`densepure models fetch {spec.name}` on a machine that is online and copy its "
             f"Hugging Face cache folder here (same path or HF_HOME), or save the model with "
             f"timm.models.save_for_hf(model, DIR, safe_serialization=True) and run with "
             f"--set classifier.source=local-dir:DIR")
    if offline:
        return _manual(spec.name, Path(where), place)
    log(f"{spec.name}: downloading {repo} into {where}")
    error: Exception | None = None
    for fname in _TIMM_WEIGHT_FILES:
        try:
            path = hf_hub_download(repo, fname, cache_dir=hub_cache)
            return FetchStep(spec.name, "fetched", path)
        except Exception as e:  # noqa: BLE001  (hub errors: not found, offline, network)
            error = e
    return _manual(spec.name, Path(where), f"download failed ({type(error).__name__}: "
                   f"{str(error).splitlines()[0] if str(error) else ''}); {place}")
