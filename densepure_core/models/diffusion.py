"""Load a diffusion UNet (the purifier's denoiser) with its noise schedule.

Diffusion models are diffusers ``UNet2DModel`` + ``DDPMScheduler`` folders, from

- a local directory, flat (``config.json``, ``diffusion_pytorch_model.safetensors`` and
  ``scheduler_config.json`` side by side) or pipeline layout (``unet/`` and ``scheduler/``);
- ``s3://bucket/prefix``: copied once into a local cache (``~/.cache/densepure/s3/<sha>``),
  re-copied only when the remote files change; endpoint and credentials come from
  ``storage_options`` (passed to ``s3fs.S3FileSystem``, e.g. ``{"endpoint_url": ...}``) or
  from the standard AWS environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_DEFAULT_REGION``, ...);
- a Hugging Face Hub id ``org/name`` (honours ``HF_HUB_OFFLINE`` and the hub cache).

Example::

    dm = load_diffusion("s3://models/ddpm-cifar10", storage_options={"endpoint_url": url})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._weights import (
    _HUB_ID,
    _SCHEDULER_CONFIG,
    _UNET_CONFIG,
    _UNET_PICKLE,
    _UNET_SAFE,
    ModelLoadError,
    _check_safetensors,
    _freeze,
    _snapshot_hub,
)

_logger = logging.getLogger(__name__)

_S3_MARKER = ".densepure-s3.json"  # written last: its presence means the copy is complete


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
