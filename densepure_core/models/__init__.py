"""Load the two models of a run: a diffusion UNet (the purifier's denoiser) and a timm classifier.

Diffusion models are diffusers ``UNet2DModel`` + ``DDPMScheduler`` folders, from

- a local directory, flat (``config.json``, ``diffusion_pytorch_model.safetensors`` and
  ``scheduler_config.json`` side by side) or pipeline layout (``unet/`` and ``scheduler/``);
- ``s3://bucket/prefix``: copied once into a local cache (``~/.cache/densepure/s3/<sha>``),
  re-copied only when the remote files change; endpoint and credentials come from
  ``storage_options`` (passed to ``s3fs.S3FileSystem``, e.g. ``{"endpoint_url": ...}``) or
  from the standard AWS environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_DEFAULT_REGION``, ...);
- a Hugging Face Hub id ``org/name`` (honours ``HF_HUB_OFFLINE`` and the hub cache).

Classifiers are timm models: a timm name with pretrained weights, ``hf-hub:org/name``,
``local-dir:/path`` (timm's ``save_for_hf`` format) or a checkpoint file plus ``model_name``.
The returned :class:`Classifier` takes images in [0, 1] and does its own channel repeat,
resize and normalization on the model's device, so the smoothing code never needs to know
the classifier's preprocessing.

Every failure raises :class:`ModelLoadError` naming the source and the fix. Weights load
strictly: a missing key, an unexpected key or a shape mismatch is an error, never a silently
re-initialised layer. Safetensors are the default; pickle files need ``allow_pickle=True``.

Example::

    dm = load_diffusion("s3://models/ddpm-cifar10", storage_options={"endpoint_url": url})
    clf = load_classifier("vit.pth", model_name="vit_base_patch16_224", num_classes=10)
    logits = clf(x01)  # [B, 10]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ModelLoadError",
    "DiffusionModel",
    "load_diffusion",
    "Classifier",
    "load_classifier",
    "file_sha256",
    "read_state_dict",
    "model_fingerprint",
    "INTERPOLATIONS",
]

_logger = logging.getLogger(__name__)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

# diffusers file names (diffusers.utils.constants)
_UNET_CONFIG = "config.json"
_SCHEDULER_CONFIG = "scheduler_config.json"
_UNET_SAFE = "diffusion_pytorch_model.safetensors"
_UNET_PICKLE = "diffusion_pytorch_model.bin"
# timm local-dir / hf-hub file names (timm.models._hub)
_TIMM_SAFE = "model.safetensors"
_TIMM_PICKLE = "pytorch_model.bin"

_S3_MARKER = ".densepure-s3.json"  # written last: its presence means the copy is complete
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_OFFLINE_FIX = ("place the weights in a local directory and pass its path, or run "
                "`densepure models fetch` on a machine that is online")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the source and tells the fix."""


# ---------------------------------------------------------------------------------------------
# shared helpers


def _hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import; reading the environment again here
    lets a caller (or a test) switch offline mode on after the import.
    """
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _is_hub_offline_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled))


def _check_safetensors(path: Path, what: str) -> None:
    """Open the header of a safetensors file: a truncated or corrupt file fails here, by name."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"{what}: weights file {path} is truncated or corrupt ({e}); copy it again "
            f"(compare its size or `sha256sum` with the original)") from e


def read_state_dict(path: Path, *, allow_pickle: bool, what: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat CPU state dict.

    ``.safetensors`` is read directly. Anything else goes through ``torch.load`` with
    ``weights_only=True`` (tensors and plain containers only, no code runs) unless
    ``allow_pickle``. Training checkpoints that nest the weights under ``state_dict`` or
    ``model`` are unwrapped, a DataParallel ``module.`` prefix is dropped, and with
    ``allow_pickle`` a whole pickled ``nn.Module`` gives its ``state_dict()``.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _check_safetensors(path, what)
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{what}: {path} holds pickled Python objects, which can run code when loaded, "
            f"so it is refused by default. Convert it once to safetensors "
            f"(`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`), or pass "
            f"allow_pickle=True (--allow-pickle on the command line) if you trust the file.") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelLoadError(
            f"{what}: cannot read {path} ({e}); the file is truncated or not a torch "
            f"checkpoint: copy it again or re-save it") from e
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(f"{what}: {path} does not contain a state dict (found "
                             f"{type(obj).__name__}); save `model.state_dict()` instead")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str,
                 file: Path | str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing or wrong."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("size mismatches", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {name}: {', '.join(items[:5])}{more}")
        raise ModelLoadError(
            f"{what}: weights in {file} do not match the architecture ({'; '.join(parts)}); "
            f"the file is partial or was saved from a different model configuration")
    model.load_state_dict(state_dict, strict=True)


def _freeze(model: torch.nn.Module, device: torch.device | str,
            dtype: torch.dtype) -> torch.nn.Module:
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def _quiet_diffusers():
    """Silence diffusers' loading chatter (we check the loading info ourselves and raise)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------
# diffusion models


@dataclass
class DiffusionModel:
    """A diffusers UNet and its noise schedule, ready for inference.

    Attributes:
        unet: ``diffusers.UNet2DModel`` in eval mode, ``requires_grad=False``, on the requested
            device/dtype; ``unet(x_t[B,C,H,W], t[B]).sample`` is the epsilon prediction
            (``[B,2C,H,W]`` for learned-variance models).
        scheduler: ``diffusers.DDPMScheduler`` built from the folder's ``scheduler_config.json``
            (betas, number of training steps, variance type).
        source: the source string as given (local path, ``s3://`` URI or hub id).
    """

    unet: Any
    scheduler: Any
    source: str


def load_diffusion(source: str, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                   cache_dir: str | os.PathLike | None = None,
                   storage_options: Mapping[str, Any] | None = None) -> DiffusionModel:
    """Load a ``UNet2DModel`` + ``DDPMScheduler`` from a local folder, ``s3://`` or the hub.

    Args:
        source: a local directory (flat or pipeline layout, see the module docstring),
            ``s3://bucket/prefix`` or a hub id ``org/name`` (optionally ``org/name@revision``).
        device: where the UNet goes.
        dtype: the UNet's parameter dtype (e.g. ``torch.float16`` on a GPU).
        allow_pickle: accept ``diffusion_pytorch_model.bin`` when no safetensors file exists
            (diffusers still reads it with ``torch.load(weights_only=True)``).
        cache_dir: for ``s3://``: the root of the local copies (default
            ``~/.cache/densepure/s3``; each URI gets its own ``<sha256(uri)[:16]>`` folder);
            for a hub id: the Hugging Face cache directory (default: the hub's own).
        storage_options: keyword arguments for ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``,
            ``secret``, ``client_kwargs``...). Without them s3fs uses the AWS environment,
            which also reads ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

    Returns:
        A :class:`DiffusionModel`.

    Raises:
        ModelLoadError: no such source, offline and not cached, not a ``UNet2DModel`` folder,
            missing, partial, truncated or pickle-only (without ``allow_pickle``) weights.
    """
    what = f"diffusion model {source!r}"
    if source.startswith("s3://"):
        local = _sync_s3_dir(source, cache_dir=cache_dir, storage_options=storage_options,
                             allow_pickle=allow_pickle)[0]
    elif Path(source).expanduser().exists():
        local = Path(source).expanduser()
        if not local.is_dir():
            raise ModelLoadError(f"{what}: {local} is a file; expected a diffusers "
                                 f"save_pretrained directory (config.json + {_UNET_SAFE} + "
                                 f"{_SCHEDULER_CONFIG})")
    elif "://" in source:
        raise ModelLoadError(f"{what}: unsupported URI scheme; use a local directory, "
                             f"s3://bucket/prefix or a hub id org/name")
    elif _HUB_ID.match(source):
        local = _snapshot_hub(source, cache_dir=cache_dir, what=what,
                              patterns=_diffusers_patterns(allow_pickle))
    else:
        raise ModelLoadError(f"{what}: no such directory, and not an s3://bucket/prefix URI or a "
                             f"hub id org/name")
    unet, scheduler = _load_diffusion_dir(local, what=what, allow_pickle=allow_pickle)
    return DiffusionModel(unet=_freeze(unet, device, dtype), scheduler=scheduler, source=source)


def _load_diffusion_dir(root: Path, *, what: str, allow_pickle: bool):
    """Load from a local flat or pipeline-layout folder (see :func:`load_diffusion`)."""
    from diffusers import DDPMScheduler, UNet2DModel

    if (root / "unet" / _UNET_CONFIG).is_file():
        unet_dir, sched_dir = root / "unet", root / "scheduler"
    elif (root / _UNET_CONFIG).is_file():
        unet_dir, sched_dir = root, root
    else:
        raise ModelLoadError(
            f"{what}: no config.json in {root} (nor {root / 'unet'}); expected a diffusers "
            f"save_pretrained directory (config.json + {_UNET_SAFE} + {_SCHEDULER_CONFIG}, or "
            f"unet/ and scheduler/ sub-folders). Convert a raw checkpoint by loading it into a "
            f"diffusers UNet2DModel and calling unet.save_pretrained(dir) and "
            f"DDPMScheduler(...).save_pretrained(dir)")
    try:
        config = json.loads((unet_dir / _UNET_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: cannot parse {unet_dir / _UNET_CONFIG} ({e})") from e
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ModelLoadError(
            f"{what}: {unet_dir / _UNET_CONFIG} describes a {cls}, not a UNet2DModel; densepure "
            f"purifies with unconditional pixel-space UNet2DModel checkpoints (DDPM, ADM "
            f"converted to diffusers)")

    safe = [unet_dir / _UNET_SAFE, unet_dir / f"{_UNET_SAFE}.index.json"]
    pickled = [unet_dir / _UNET_PICKLE, unet_dir / f"{_UNET_PICKLE}.index.json"]
    if any(p.is_file() for p in safe):
        use_safetensors = True
        weight_files = _shard_files(unet_dir, safe, what)
        for f in weight_files:
            _check_safetensors(f, what)
    elif any(p.is_file() for p in pickled):
        found = next(p for p in pickled if p.is_file())
        if not allow_pickle:
            raise ModelLoadError(
                f"{what}: only pickle weights ({found}) and no {_UNET_SAFE}; pickle files are "
                f"refused by default. Convert once with `UNet2DModel.from_pretrained(dir, "
                f"use_safetensors=False).save_pretrained(dir)` (writes safetensors), or pass "
                f"allow_pickle=True if you trust the file")
        use_safetensors = False
        weight_files = _shard_files(unet_dir, pickled, what)
    else:
        raise ModelLoadError(
            f"{what}: no weights in {unet_dir}: expected {_UNET_SAFE} next to config.json "
            f"(the folder is incomplete: copy the weights file too, or re-run save_pretrained; "
            f"a remote source with only pickle {_UNET_PICKLE} weights needs allow_pickle=True)")
    if not (sched_dir / _SCHEDULER_CONFIG).is_file():
        raise ModelLoadError(
            f"{what}: no {_SCHEDULER_CONFIG} in {sched_dir}; the noise schedule is part of the "
            f"model: save it with DDPMScheduler(num_train_timesteps=..., beta_schedule=...)"
            f".save_pretrained({str(sched_dir)!r})")

    try:
        with _quiet_diffusers():
            # low_cpu_mem_usage=False: with accelerate installed, missing weights would stay on
            # the meta device instead of showing up in the loading info we check below.
            unet, info = UNet2DModel.from_pretrained(
                str(unet_dir), use_safetensors=use_safetensors, low_cpu_mem_usage=False,
                output_loading_info=True)
            scheduler = DDPMScheduler.from_pretrained(str(sched_dir))
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())
        if "size mismatch" in msg:
            # diffusers suggests ignore_mismatched_sizes=True, i.e. random layers: never here
            details = [f"{k}: file [{a}] vs model [{b}]" for k, a, b in re.findall(
                r"size mismatch for ([\w.]+): copying a param with shape "
                r"torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
                r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)", msg)]
            raise ModelLoadError(
                f"{what}: weights in {', '.join(str(f) for f in weight_files)} do not match "
                f"{unet_dir / _UNET_CONFIG} ({'; '.join(details) or msg}); the file belongs to "
                f"another configuration: use the config.json saved with these weights") from e
        raise ModelLoadError(f"{what}: loading {unet_dir} failed: {msg}") from e
    bad = {k: v for k, v in info.items() if v}
    if bad:
        detail = "; ".join(f"{k}: {v[:5]}" for k, v in bad.items())
        raise ModelLoadError(
            f"{what}: weights in {', '.join(str(f) for f in weight_files)} do not match "
            f"{unet_dir / _UNET_CONFIG} ({detail}); the file is partial or belongs to another "
            f"configuration")
    return unet, scheduler


def _shard_files(folder: Path, candidates: list[Path], what: str) -> list[Path]:
    """The weight files behind a single file or a sharded ``*.index.json``; all must exist."""
    single, index = candidates
    if single.is_file():
        return [single]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{what}: cannot parse shard index {index} ({e})") from e
    files = [folder / s for s in shards]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{what}: shard index {index} names missing files: "
                             f"{', '.join(missing)}; copy the whole folder again")
    return files


def _diffusers_patterns(allow_pickle: bool) -> list[str]:
    """The files of a flat or pipeline-layout diffusers repo that the loader reads."""
    names = ["config.json", _SCHEDULER_CONFIG, f"{_UNET_SAFE}*",
             "diffusion_pytorch_model-*.safetensors"]
    if allow_pickle:
        names += [f"{_UNET_PICKLE}*", "diffusion_pytorch_model-*.bin"]
    return [*names, *(f"unet/{n}" for n in names), f"scheduler/{_SCHEDULER_CONFIG}"]


def _snapshot_hub(repo: str, *, cache_dir, what: str, patterns: list[str]) -> Path:
    """Download (or find in the cache) the files of a hub repo that match ``patterns``."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo.partition("@")
    offline = _hub_offline()
    try:
        path = snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir,
                                 allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # noqa: BLE001  (the hub raises many types; all mean "not here")
        if offline or _is_hub_offline_error(e):
            raise ModelLoadError(
                f"{what}: offline and {repo_id!r} is not in the local cache "
                f"(and no local directory of that name exists): {_OFFLINE_FIX}") from e
        raise ModelLoadError(f"{what}: cannot fetch {repo_id!r} from the Hugging Face Hub "
                             f"({type(e).__name__}: {e}); check the id, revision and access "
                             f"token, or pass a local directory").replace("\n", " ") from e
    return Path(path)


def _sync_s3_dir(uri: str, *, cache_dir=None, storage_options=None,
                 allow_pickle: bool = False) -> tuple[Path, int]:
    """Mirror ``s3://bucket/prefix`` into the local cache; return (local dir, files copied).

    The remote listing (size + ETag of every file) is compared with the marker written after
    the last complete copy: unchanged files are not fetched again, changed ones are. Each file
    is downloaded to a temporary name and renamed into place, and the marker is written last,
    so an interrupted copy is never mistaken for a complete one. Only ``*.json`` and
    ``*.safetensors`` are copied (plus ``*.bin`` with ``allow_pickle``); pickle-only weights
    are refused from the listing, before any download.
    """
    from densepure_core import remote

    what = f"diffusion model {uri!r}"
    root = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/densepure/s3").expanduser()
    local = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    prefix = uri[len("s3://"):].rstrip("/")
    try:
        fs, _ = remote.filesystem_for(uri, storage_options)  # the one S3 factory: its timeouts
        fs.invalidate_cache(prefix)  # the listing must reflect the bucket now, not earlier calls
        listing = fs.find(prefix, detail=True)
    except Exception as e:  # noqa: BLE001  (botocore/aiohttp errors have no common base)
        raise ModelLoadError(
            f"{what}: cannot list the S3 prefix ({type(e).__name__}: {e}); check the bucket "
            f"name, credentials (AWS_ACCESS_KEY_ID/...) and endpoint (storage_options="
            f"{{'endpoint_url': ...}} or AWS_ENDPOINT_URL_S3)").replace("\n", " ") from e
    files = {}
    for key, info in listing.items():
        if info.get("type", "file") != "file":
            continue
        files[key[len(prefix):].lstrip("/")] = {"size": int(info["size"]),
                                                "etag": str(info.get("ETag", ""))}
    if not files:
        raise ModelLoadError(f"{what}: no files under the prefix; upload the diffusers folder "
                             f"(config.json, {_UNET_SAFE}, {_SCHEDULER_CONFIG})")
    dirs_with_safe = {str(Path(r).parent) for r in files if r.endswith(".safetensors")}
    pickle_only = [r for r in files if Path(r).name.startswith("diffusion_pytorch_model")
                   and r.endswith(".bin") and str(Path(r).parent) not in dirs_with_safe]
    if pickle_only and not allow_pickle:
        # refuse before downloading: the pickle file may be gigabytes
        raise ModelLoadError(
            f"{what}: only pickle weights (s3://{prefix}/{pickle_only[0]}) and no {_UNET_SAFE}; "
            f"pickle files are refused by default. Convert once with `UNet2DModel.from_pretrained("
            f"dir, use_safetensors=False).save_pretrained(dir)` and upload the safetensors file, "
            f"or pass allow_pickle=True if you trust the file")
    wanted = {r: m for r, m in files.items()
              if r.endswith((".json", ".safetensors")) or (allow_pickle and r.endswith(".bin"))}

    marker = local / _S3_MARKER
    try:
        done = json.loads(marker.read_text())["files"] if marker.is_file() else {}
    except (OSError, ValueError, KeyError):
        done = {}
    todo = [r for r, m in wanted.items()
            if done.get(r) != m or not (local / r).is_file()
            or (local / r).stat().st_size != m["size"]]
    if not todo:
        return local, 0
    marker.unlink(missing_ok=True)
    for rel in todo:
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
        try:
            fs.get_file(f"{prefix}/{rel}", str(tmp))
        except Exception as e:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise ModelLoadError(f"{what}: downloading {rel} failed ({type(e).__name__}: {e})"
                                 ) from e
        if tmp.stat().st_size != wanted[rel]["size"]:
            tmp.unlink(missing_ok=True)
            raise ModelLoadError(f"{what}: {rel} arrived with {tmp.stat().st_size} bytes, "
                                 f"expected {wanted[rel]['size']}; retry the load")
        os.replace(tmp, dest)
    tmp_marker = marker.with_name(f"{marker.name}.part-{os.getpid()}")
    tmp_marker.write_text(json.dumps({"uri": uri, "files": wanted}, indent=1, sort_keys=True))
    os.replace(tmp_marker, marker)
    _logger.info("copied %d file(s) of %s into %s", len(todo), uri, local)
    return local, len(todo)


# ---------------------------------------------------------------------------------------------
# classifiers


class Classifier(torch.nn.Module):
    """A classifier on images in [0, 1]: channel repeat, resize, normalize, then the model.

    All preprocessing runs on the model's device, in float32 (so resizing a bf16/fp16 model's
    input is as accurate as for fp32), and the result is cast to the model's dtype. timm's
    ``crop_pct`` is deliberately ignored: a smoothed classifier must see the whole image it
    certifies, so the image is resized to ``input_size`` without cropping.

    Args:
        model: any ``nn.Module`` mapping normalized ``[B, in_chans, H, W]`` to logits.
        input_size: ``(H, W)`` (or an int) the model expects; inputs of another size are resized.
        interpolation: ``"bicubic"`` | ``"bilinear"`` | ``"nearest"`` (``F.interpolate``,
            ``align_corners=False``, no antialiasing).
        mean: per-channel mean, one value or ``in_chans`` values.
        std: per-channel std, one value or ``in_chans`` values.
        in_chans: channels the model takes; 1-channel inputs are repeated when it is 3.
        num_classes: number of logits (default ``model.num_classes``).
        source: where the model came from (for logs and run metadata).
    """

    def __init__(self, model: torch.nn.Module, *, input_size: int | tuple[int, int],
                 interpolation: str, mean, std, in_chans: int = 3,
                 num_classes: int | None = None, source: str = "") -> None:
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r} is not supported; use one of "
                             f"{', '.join(INTERPOLATIONS)}")
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2:
            raise ValueError(f"input_size={input_size!r}: expected (H, W) or an int")
        mean, std = _per_channel(mean, in_chans, "mean"), _per_channel(std, in_chans, "std")
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None)
            if num_classes is None:
                raise ValueError("num_classes is required for a model without a num_classes "
                                 "attribute")
        self.model = model
        self.num_classes = int(num_classes)
        self.input_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.interpolation = interpolation
        self.mean: tuple[float, ...] = mean
        self.std: tuple[float, ...] = std
        self.in_chans = int(in_chans)
        self.source = source
        # non-persistent: they follow .to(device) but stay out of state_dict and fingerprints
        self.register_buffer("_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device of the wrapped model (where preprocessing runs)."""
        return next(self.model.parameters(), self._mean).device

    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] (any device) -> normalized model input, float32.

        Returns:
            ``[B, in_chans, *input_size]`` on the model's device.
        """
        if x01.ndim != 4:
            raise ValueError(f"x01 must be [B, C, H, W] in [0, 1], got shape {tuple(x01.shape)}")
        x = x01.to(device=self._mean.device, dtype=torch.float32)
        c = x.shape[1]
        if c != self.in_chans:
            if c == 1:
                x = x.expand(-1, self.in_chans, -1, -1)  # grayscale into an RGB model
            else:
                raise ValueError(f"x01 has {c} channels but the classifier takes "
                                 f"{self.in_chans}; convert the images first")
        if tuple(x.shape[-2:]) != self.input_size:
            kw = {} if self.interpolation == "nearest" else {"align_corners": False}
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, **kw)
        return (x - self._mean) / self._std

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Logits of images in [0, 1].

        Args:
            x01: ``[B, C, H, W]`` float in [0, 1]; C is ``in_chans`` or 1.

        Returns:
            ``[B, num_classes]`` logits in the model's dtype.
        """
        dtype = next(self.model.parameters(), self._mean).dtype
        return self.model(self.preprocess(x01).to(dtype))


def _per_channel(values, in_chans: int, name: str) -> tuple[float, ...]:
    vals = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * in_chans
    if len(vals) != in_chans:
        raise ValueError(f"{name}={values!r}: expected 1 or {in_chans} values")
    return vals


def load_classifier(source: str, *, num_classes: int | None = None, model_name: str | None = None,
                    input_size: int | tuple[int, int] | None = None,
                    interpolation: str | None = None, mean=None, std=None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    allow_pickle: bool = False, model_args: Mapping[str, Any] | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Classifier:
    """Load a timm classifier with its preprocessing.

    Args:
        source: one of
            - a timm model name with pretrained weights (``"beit_large_patch16_512"``, optionally
              ``name.tag``); weights come from the hub / timm's URLs;
            - ``"hf-hub:org/name"`` (a timm repo: config.json + model.safetensors);
            - ``"local-dir:/path"``: timm's local format, ``config.json`` (architecture,
              num_classes, optional model_args, pretrained_cfg) + ``model.safetensors``
              (or ``pytorch_model.bin``), as written by
              ``timm.models.save_for_hf(model, path, safe_serialization=True)``;
            - a checkpoint file (``.safetensors``, or ``.pth/.pt/.bin/.ckpt`` read with
              ``torch.load(weights_only=True)``); needs ``model_name`` and ``num_classes``.
        num_classes: expected number of classes. Required for checkpoint files; for other
            sources a mismatch with the loaded head is an error (the head is never reset).
        model_name: timm architecture (optionally with a pretrained tag, which then supplies the
            default preprocessing) for checkpoint files; elsewhere, if given, it must match.
        input_size: ``(H, W)`` or int; default from timm's resolved data config.
        interpolation: ``"bicubic"`` | ``"bilinear"`` | ``"nearest"``; default from timm.
        mean: normalization mean; default from timm.
        std: normalization std; default from timm.
        device: target device.
        dtype: parameter dtype of the model.
        allow_pickle: let ``torch.load`` unpickle arbitrary objects (trusted files only).
        model_args: extra ``timm.create_model`` keyword arguments (``img_size``, ``in_chans``,
            ``drop_path_rate``...) for timm names and checkpoint files.
        cache_dir: Hugging Face cache directory for hub downloads (default: the hub's own).

    Returns:
        A :class:`Classifier` in eval mode with ``requires_grad=False``.

    Raises:
        ModelLoadError: unknown architecture, offline and not cached, missing/partial/corrupt
            weights, pickle refused, or ``num_classes`` different from the loaded head.
    """
    import timm

    what = f"classifier {source!r}"
    model_args = dict(model_args or {})
    if "num_classes" in model_args:
        raise ValueError("pass num_classes=, not model_args['num_classes'] (the head is never "
                         "reset: num_classes must match the weights)")
    prefix, sep, rest = source.partition(":")
    if sep and prefix == "local-dir":
        model = _load_timm_dir(Path(rest).expanduser(), what=what, allow_pickle=allow_pickle)
    elif sep and prefix == "hf-hub":
        local = _snapshot_hub(rest, cache_dir=cache_dir, what=what,
                              patterns=["config.json", _TIMM_SAFE])
        if not (local / _TIMM_SAFE).is_file():
            # older timm repos only have pytorch_model.bin (read below with weights_only=True)
            local = _snapshot_hub(rest, cache_dir=cache_dir, what=what,
                                  patterns=["config.json", _TIMM_PICKLE])
        model = _load_timm_dir(local, what=what, allow_pickle=allow_pickle)
    elif source.endswith(_CHECKPOINT_SUFFIXES) or Path(source).expanduser().is_file():
        model = _load_timm_checkpoint(Path(source).expanduser(), what=what, model_name=model_name,
                                      num_classes=num_classes, allow_pickle=allow_pickle,
                                      model_args=model_args)
    elif Path(source).expanduser().is_dir():
        raise ModelLoadError(f"{what}: is a directory; for timm's local format pass "
                             f"'local-dir:{source}', for a checkpoint pass the file itself")
    elif any(c in source for c in "/\\:"):
        hint = f" (a hub repo? use 'hf-hub:{source}')" if _HUB_ID.match(source) else ""
        raise ModelLoadError(f"{what}: not a file, a timm model name, 'hf-hub:org/name' or "
                             f"'local-dir:/path'{hint}")
    elif not timm.is_model(source.split(".")[0]):
        raise ModelLoadError(f"{what}: not a timm model name (see timm.list_models()), a file, "
                             f"'hf-hub:org/name' or 'local-dir:/path'")
    else:
        try:
            model = timm.create_model(source, pretrained=True, **model_args)
        except Exception as e:  # noqa: BLE001  (hub, URL and timm errors differ in type)
            if _is_hub_offline_error(e) or _hub_offline():
                raise ModelLoadError(f"{what}: offline and {source!r} is not in the local cache: "
                                     f"{_OFFLINE_FIX}") from e
            raise ModelLoadError(f"{what}: cannot load the pretrained weights ({type(e).__name__}"
                                 f": {e}); download them on an online machine and pass the file "
                                 f"with model_name=").replace("\n", " ") from e
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    if model_name is not None and model_name.split(".")[0] != arch:
        raise ModelLoadError(f"{what}: model_name={model_name!r} but the source holds a {arch!r}; "
                             f"drop model_name or fix it")
    loaded = getattr(model, "num_classes", None)
    if num_classes is not None and loaded != num_classes:
        raise ModelLoadError(f"{what}: the model has {loaded} output classes but num_classes="
                             f"{num_classes}; load a checkpoint trained for {num_classes} classes "
                             f"(the head is never reset silently)")

    data = timm.data.resolve_input_data_config(model)
    in_chans, *size = data["input_size"]
    interp = interpolation or data["interpolation"]
    if interp not in INTERPOLATIONS:
        raise ModelLoadError(f"{what}: timm's config asks for interpolation {interp!r}, which "
                             f"the on-device resize does not support; pass interpolation= one of "
                             f"{', '.join(INTERPOLATIONS)}")
    clf = Classifier(model, input_size=input_size if input_size is not None else tuple(size),
                     interpolation=interp, mean=mean if mean is not None else data["mean"],
                     std=std if std is not None else data["std"], in_chans=in_chans,
                     num_classes=loaded, source=source)
    _freeze(clf.model, device, dtype)
    clf.to(device=device)  # the mean/std buffers stay float32 (preprocessing runs in float32)
    clf.eval()
    return clf


def _load_timm_dir(folder: Path, *, what: str, allow_pickle: bool) -> torch.nn.Module:
    import timm

    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{what}: no config.json in {folder}; expected timm's local-dir format (config.json "
            f"+ {_TIMM_SAFE}) as written by timm.models.save_for_hf(model, dir, "
            f"safe_serialization=True)")
    try:
        # pretrained=False: build architecture + model_args + pretrained_cfg from config.json;
        # we load the weights ourselves, strictly (timm would drop a mismatched head).
        model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{what}: cannot build the model described by {folder / 'config.json'}"
                             f" ({type(e).__name__}: {e})") from e
    if (folder / _TIMM_SAFE).is_file():
        file = folder / _TIMM_SAFE
    elif (folder / _TIMM_PICKLE).is_file():
        file = folder / _TIMM_PICKLE
    else:
        raise ModelLoadError(f"{what}: no weights in {folder}: expected {_TIMM_SAFE} next to "
                             f"config.json (the folder is incomplete: copy the weights too)")
    _load_strict(model, read_state_dict(file, allow_pickle=allow_pickle, what=what),
                 what=what, file=file)
    return model


def _load_timm_checkpoint(file: Path, *, what: str, model_name: str | None,
                          num_classes: int | None, allow_pickle: bool,
                          model_args: dict) -> torch.nn.Module:
    import timm

    if model_name is None or num_classes is None:
        raise ModelLoadError(f"{what}: a checkpoint file holds weights only; pass the timm "
                             f"architecture and class count, e.g. model_name="
                             f"'vit_base_patch16_224', num_classes=10")
    if not file.is_file():
        raise ModelLoadError(f"{what}: no such file")
    state_dict = read_state_dict(file, allow_pickle=allow_pickle, what=what)
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                                  **model_args)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{what}: cannot build timm model {model_name!r} ({type(e).__name__}:"
                             f" {e}); see timm.list_models()") from e
    heads = model.pretrained_cfg.get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        w = state_dict.get(f"{head}.weight")
        if w is not None and w.ndim >= 1 and w.shape[0] != num_classes:
            raise ModelLoadError(f"{what}: the checkpoint has {w.shape[0]} output classes "
                                 f"({head}.weight) but num_classes={num_classes}; pass "
                                 f"num_classes={w.shape[0]} or the checkpoint trained for "
                                 f"{num_classes} classes")
    _load_strict(model, state_dict, what=what, file=file)
    return model


# ---------------------------------------------------------------------------------------------
# hashes for run metadata


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
