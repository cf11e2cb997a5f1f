"""Load the two models of a run: a diffusion UNet (the purifier's denoiser) and a timm classifier.

Diffusion models are diffusers ``UNet2DModel`` + ``DDPMScheduler`` folders, from a local
directory, ``s3://bucket/prefix`` (cached locally) or a Hugging Face Hub id
(:mod:`densepure_core.models.diffusion` says how each is read).

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

The package, one job per module: ``_weights`` (the error type, safe and strict weight loading,
hub helpers), ``diffusion`` (:func:`load_diffusion`), ``classifier`` (:func:`load_classifier`),
``fingerprint`` (hashes for run metadata), ``accel`` (channels_last and torch.compile for a loaded
module), ``adm`` (OpenAI's ADM UNet in diffusers terms and the checkpoint converter), ``presets``
(the papers' checkpoints and ``models fetch``) and ``toy`` (the bundled digits models: architecture
and training recipe, ``densepure train-toy``).

Imports :mod:`densepure_core.remote` (S3) and :mod:`densepure_core.data` (the digits, for ``toy``).
"""

from __future__ import annotations

from ._weights import ModelLoadError, read_state_dict
from .classifier import INTERPOLATIONS, Classifier, load_classifier
from .diffusion import DiffusionModel, load_diffusion
from .fingerprint import file_sha256, model_fingerprint

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
