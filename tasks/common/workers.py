"""What the Ray workers of every job share: the device, and how a bad image stops a run.

Imports :mod:`densepure_core` only.
"""

from __future__ import annotations

import torch

from densepure_core.data.sources import DatasetError

__all__ = ["BadInputError", "stopped_by_bad_input", "check_image_fits", "image_fit_problem", "resolve_device",
           "root_cause"]


def root_cause(exc: BaseException) -> BaseException:
    """The user's error inside Ray's and Prefect's wrappers (RayTaskError keeps it as .cause)."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


class BadInputError(ValueError):
    """A bad image or a bad model output under on_bad_input=fail; names the image and the fix."""


def stopped_by_bad_input(exc: Exception) -> BadInputError:
    """The error that stops a run at a bad image (``on_bad_input: fail``): the image's problem, then
    what was kept and the two ways on. Both jobs raise it."""
    return BadInputError(f"{exc}\nThe run stopped (on_bad_input: fail); finished shards are kept and a rerun "
                         f"resumes. Fix or remove the image, or set on_bad_input: quarantine to record such "
                         f"images in the errors table and go on.")


def check_image_fits(x: torch.Tensor, rec, unet) -> None:
    """Raise DatasetError when image ``x`` ``[C, H, W]`` is not the diffusion model's size and channels."""
    size, channels = unet.config.sample_size, unet.config.in_channels
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if tuple(x.shape[-2:]) != size or x.shape[0] != channels:
        # the plan's message and fix (a wrong channel count is no image_size matter)
        raise DatasetError(f"image {rec.uri!r} has "
                           f"{image_fit_problem(x.shape[0], tuple(x.shape[-2:]), channels, size)}")


def image_fit_problem(channels: int, size: tuple[int, int] | None, model_channels: int,
                      model_size: tuple[int, int] | None) -> str | None:
    """Why images of ``channels`` x ``size`` (H, W; None: unknown) cannot go into a diffusion model
    taking ``model_channels`` x ``model_size``, and the setting that fixes it; None if they fit.
    One message for the plan and the workers (callers say which images)."""
    if channels != model_channels:
        setting = ("set dataset.channels: 1 (reads the image files as grayscale)" if model_channels == 1 else
                   "set dataset.channels: 3 (reads the image files as RGB)" if model_channels == 3 else
                   "use a diffusion model of 1 or 3 channels")
        return (f"{channels} channel(s), but the diffusion model takes {model_channels}: {setting}; "
                f"dataset.image_size cannot change the channels")
    if size is not None and model_size is not None and tuple(size) != tuple(model_size):
        return (f"{size[0]}x{size[1]} pixels, but the diffusion model takes {model_size[0]}x{model_size[1]}: set "
                f"dataset.image_size: {model_size[0]} to resize and center-crop every image")
    return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
