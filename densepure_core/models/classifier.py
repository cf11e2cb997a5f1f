"""Load a timm classifier wrapped with its own preprocessing.

Classifiers are timm models: a timm name with pretrained weights, ``hf-hub:org/name``,
``local-dir:/path`` (timm's ``save_for_hf`` format) or a checkpoint file plus ``model_name``.
The returned :class:`Classifier` takes images in [0, 1] and does its own channel repeat,
resize and normalization on the model's device, so the smoothing code never needs to know
the classifier's preprocessing.

Example::

    clf = load_classifier("vit.pth", model_name="vit_base_patch16_224", num_classes=10)
    logits = clf(x01)  # [B, 10]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._weights import (
    _CHECKPOINT_SUFFIXES,
    _HUB_ID,
    _OFFLINE_FIX,
    _TIMM_PICKLE,
    _TIMM_SAFE,
    ModelLoadError,
    _freeze,
    _hub_offline,
    _is_hub_offline_error,
    _load_strict,
    _snapshot_hub,
    read_state_dict,
)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


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

    if not file.is_file():  # first: a missing file is the problem, whatever else is missing
        raise ModelLoadError(f"{what}: no such file; check the path (a timm name, 'hf-hub:org/name' or "
                             f"'local-dir:/path' are the other kinds of source)")
    if model_name is None or num_classes is None:
        raise ModelLoadError(f"{what}: a checkpoint file holds weights only; pass the timm "
                             f"architecture and class count, e.g. model_name="
                             f"'vit_base_patch16_224', num_classes=10")
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
