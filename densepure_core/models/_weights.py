"""Shared by both loaders: the error type, safe and strict weight loading, hub helpers.

Every failure raises :class:`ModelLoadError` naming the source and the fix. Weights load
strictly: a missing key, an unexpected key or a shape mismatch is an error, never a silently
re-initialised layer. Safetensors are the default; pickle files need ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

# diffusers file names (diffusers.utils.constants)
_UNET_CONFIG = "config.json"
_SCHEDULER_CONFIG = "scheduler_config.json"
_UNET_SAFE = "diffusion_pytorch_model.safetensors"
_UNET_PICKLE = "diffusion_pytorch_model.bin"
# timm local-dir / hf-hub file names (timm.models._hub)
_TIMM_SAFE = "model.safetensors"
_TIMM_PICKLE = "pytorch_model.bin"

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


def _reason(exc: BaseException) -> str:
    """One sentence of an error's text: torch's unpickler errors are paragraphs of advice (to load
    with weights_only=False, which is no help for bytes that are no checkpoint) around the fact."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    fact = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
    return fact.split(". ")[0][:160] or type(exc).__name__


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
    corrupt = (f"{what}: cannot read {path}: the file is truncated, corrupt or not a torch checkpoint; "
               f"delete it and copy or download it again (compare its size or `sha256sum` with the original)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        # weights_only refuses a global it does not allow: a real pickle of Python objects. Any
        # other refusal (an unknown opcode, ...) is bytes that are no checkpoint at all.
        if "Unsupported global" not in str(e) and "Unsupported class" not in str(e):
            raise ModelLoadError(f"{corrupt} (the unpickler stopped: {_reason(e)})") from e
        raise ModelLoadError(
            f"{what}: {path} holds pickled Python objects, which can run code when loaded, "
            f"so it is refused by default. Convert it once to safetensors "
            f"(`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`), or pass "
            f"allow_pickle=True (--allow-pickle on the command line) if you trust the file.") from e
    except OSError as e:
        raise ModelLoadError(f"{what}: cannot read {path} ({e})") from e
    except Exception as e:  # noqa: BLE001 - random bytes fail anywhere in the unpickler (IndexError,
        # KeyError, UnicodeDecodeError, RuntimeError of the zip reader, EOFError, ...)
        raise ModelLoadError(f"{corrupt} ({type(e).__name__}: {_reason(e)})") from e
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
    current = next(iter(model.parameters()), None)
    if current is not None and current.dtype == dtype:
        model.to(device=device)  # no dtype: diffusers warns about any dtype cast, even a no-op one
    else:
        model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


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
