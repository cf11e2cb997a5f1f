"""Datasets to certify: enumerate image records and load one image as a [C,H,W] tensor in [0,1].

Three kinds (``DatasetConfig.kind``):

- ``digits``: scikit-learn's digits, bundled (ids ``digits-<index>``);
- ``imagefolder``: one sub-folder per class, labels in sorted folder order (torchvision's
  ImageFolder, the ImageNet val layout) or in the order of ``classes_file``; local or ``s3://``;
  image ids are paths relative to the root;
- ``manifest``: a Parquet or CSV file with columns ``image_id, uri, label`` (label -1 if
  unknown); uris local or ``s3://``.

Images are converted to RGB (grayscale, palette, RGBA and 16-bit images included), resized so
the shorter side is ``image_size`` (bicubic) and center-cropped to ``image_size`` x
``image_size``, as the diffusion papers prepare ImageNet for the 256x256 ADM model.
Selection follows the papers: every m-th image from ``start``, at most ``max_images``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..config import DatasetConfig
from ..remote import filesystem_for

__all__ = ["ImageRecord", "DatasetError", "enumerate_records", "select_records", "load_image",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DatasetError(ValueError):
    """A dataset or one of its images is unusable; the message names the item and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    uri: str
    label: int


def _digits_records(cfg: DatasetConfig) -> tuple[list[ImageRecord], int]:
    from .digits import DIGITS_NUM_CLASSES, load_digits_split

    split = load_digits_split(cfg.split)
    labels = np.asarray(split.labels)
    return [ImageRecord(i, f"digits:{i}", int(y)) for i, y in zip(split.ids, labels)], DIGITS_NUM_CLASSES


def _imagefolder_records(cfg: DatasetConfig) -> tuple[list[ImageRecord], int]:
    fs, root = filesystem_for(cfg.path)
    scheme = "s3://" if cfg.path.startswith("s3://") else ""
    if not fs.isdir(root):
        raise DatasetError(f"dataset.path {cfg.path!r} is not a directory; an ImageFolder tree needs "
                           f"one sub-folder per class (e.g. val/n01440764/*.JPEG)")
    present = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))
    if cfg.classes_file:
        cfs, cpath = filesystem_for(cfg.classes_file)
        with cfs.open(cpath, "rt") as f:
            classes = [line.strip() for line in f if line.strip()]
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DatasetError(f"dataset {cfg.path!r}: folders {unknown[:5]} are not in classes_file "
                               f"{cfg.classes_file!r}; remove them or add them to the file")
    else:
        classes = present
    if not classes:
        raise DatasetError(f"dataset {cfg.path!r} has no class sub-folders; expected root/<class>/<image>")
    records = []
    for label, name in enumerate(classes):
        folder = f"{root.rstrip('/')}/{name}"
        if not fs.isdir(folder):
            continue
        for p in sorted(fs.find(folder)):
            if p.lower().endswith(IMAGE_EXTENSIONS):
                rel = p[len(root.rstrip('/')) + 1:]
                records.append(ImageRecord(rel, scheme + p, label))
    return records, len(classes)


def _check_manifest_labels(frame, path: str) -> None:
    """Every label is an integer >= -1 (-1: unknown); else name the manifest, the row and the fix."""
    import pandas as pd

    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = labels.isna() | (labels != labels.round()) | (labels < -1)
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        value = frame["label"].iloc[i]
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain Python for the message
        raise DatasetError(
            f"manifest {path!r}, row {i + 1} (image_id {frame['image_id'].iloc[i]!r}): column 'label' holds "
            f"{value!r} ({int(bad.sum())} such row(s)); a label must be a class index >= 0, or -1 "
            f"where the label is unknown: fix the label column")


def _manifest_records(cfg: DatasetConfig) -> tuple[list[ImageRecord], int]:
    import pandas as pd

    path = cfg.path
    try:
        mfs, mpath = filesystem_for(path)
        with mfs.open(mpath, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise DatasetError(f"manifest {path!r} does not exist") from exc
    parquet = path.endswith(".parquet")
    try:
        frame = (pd.read_parquet if parquet else pd.read_csv)(io.BytesIO(data))
    except Exception as exc:  # pyarrow / pandas parser errors name a buffer, not the file
        kind = "Parquet" if parquet else "CSV"
        raise DatasetError(f"manifest {path!r} cannot be read as {kind} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); a manifest is a Parquet file "
                           f"(name ending .parquet) or a CSV file with columns image_id, uri, label") from None
    missing = {"image_id", "uri", "label"} - set(frame.columns)
    if missing:
        raise DatasetError(f"manifest {path!r} lacks columns {sorted(missing)}; "
                           f"it needs image_id, uri, label (-1 if unknown)")
    _check_manifest_labels(frame, path)
    dup = frame["image_id"][frame["image_id"].duplicated()]
    if len(dup):
        raise DatasetError(f"manifest {path!r}: image_id values repeat (e.g. {dup.iloc[0]!r}); ids must be unique")
    base = os.path.dirname(path)
    records = []
    for row in frame.itertuples(index=False):
        uri = str(row.uri)
        if "://" not in uri and not os.path.isabs(uri):
            uri = os.path.join(base, uri)  # relative to the manifest
        records.append(ImageRecord(str(row.image_id), uri, int(row.label)))
    num_classes = int(frame["label"].max()) + 1 if len(frame) else 0
    return records, num_classes


def missing_local_files(records: list[ImageRecord]) -> list[ImageRecord]:
    """The records whose URI is a local path that does not exist (one ``stat`` each; remote
    URIs and bundled digits are not checked here: :func:`missing_files` does S3)."""
    return [r for r in records if "://" not in r.uri and not r.uri.startswith("digits:")
            and not os.path.exists(r.uri)]


def missing_s3_files(records: list[ImageRecord]) -> list[ImageRecord]:
    """The records whose ``s3://`` object does not exist: one listing per parent prefix (an
    ImageNet-style tree of 1,000 class folders costs 1,000 listings, not 50,000 requests)."""
    by_prefix: dict[str, list[ImageRecord]] = {}
    for r in records:
        if r.uri.startswith("s3://"):
            by_prefix.setdefault(r.uri.rsplit("/", 1)[0], []).append(r)
    missing = []
    for prefix, group in by_prefix.items():
        fs, path = filesystem_for(prefix)
        try:
            present = {p.rstrip("/") for p in fs.ls(path, detail=False, refresh=True)}
        except FileNotFoundError:
            present = set()
        missing += [r for r in group if filesystem_for(r.uri)[1] not in present]
    return missing


def missing_files(records: list[ImageRecord]) -> list[ImageRecord]:
    """Local files and S3 objects named by ``records`` that do not exist (other schemes: the
    workers report them), in record order."""
    gone = {id(r) for r in missing_local_files(records) + missing_s3_files(records)}
    return [r for r in records if id(r) in gone]


def enumerate_records(cfg: DatasetConfig) -> tuple[list[ImageRecord], int]:
    """All records of the dataset in a stable order, and the number of classes."""
    records, num_classes = {
        "digits": _digits_records,
        "imagefolder": _imagefolder_records,
        "manifest": _manifest_records,
    }[cfg.kind](cfg)
    if not records:
        raise DatasetError(f"dataset ({cfg.kind}, path={cfg.path!r}) has no images; "
                           f"check the path and the file extensions {IMAGE_EXTENSIONS}")
    return records, num_classes


def select_records(records: list[ImageRecord], cfg: DatasetConfig) -> list[ImageRecord]:
    """Every ``every``-th record from ``start``, at most ``max_images``."""
    chosen = records[cfg.start::cfg.every]
    if cfg.max_images is not None:
        chosen = chosen[:cfg.max_images]
    if not chosen:
        raise DatasetError(f"dataset selection (start={cfg.start}, every={cfg.every}) picks no image "
                           f"out of {len(records)}")
    return chosen


@lru_cache(maxsize=4)
def _digits_images(image_size: int | None):
    from .digits import load_digits_split

    split = load_digits_split("all", image_size) if image_size else load_digits_split("all")
    images = torch.as_tensor(np.asarray(split.images), dtype=torch.float32)
    return dict(zip(split.ids, images))


def _decode(data: bytes, uri: str, image_size: int | None, channels: int | None = None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DatasetError(f"image {uri!r} is an empty file; remove it from the dataset or replace it")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"image {uri!r} is too large to decode safely ({exc}); it may be a decompression bomb: "
                           f"remove it, or downscale it below Pillow's limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {uri!r} cannot be decoded ({exc}); the file is corrupt or not an image: "
                           f"replace or remove it") from exc
    if img.mode == "F":  # 32-bit float pixels have no fixed range: converting would guess (and gave black images)
        raise DatasetError(f"image {uri!r} has 32-bit float pixels (mode F), whose range is not defined; convert "
                           f"it to an 8- or 16-bit image (e.g. scaled to 0..255) or remove it")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("L" if channels == 1 else "RGB")
    if image_size:
        w, h = img.size
        scale = image_size / min(w, h)
        img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                         Image.BICUBIC)
        w, h = img.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:  # grayscale: one channel
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image(record: ImageRecord, cfg: DatasetConfig) -> torch.Tensor:
    """The record's image as float32 [C,H,W] in [0,1]. Raises DatasetError naming the image."""
    if record.uri.startswith("digits:"):
        return _digits_images(cfg.image_size)[record.image_id]
    fs, path = filesystem_for(record.uri)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise DatasetError(f"image {record.uri!r} (image_id {record.image_id!r}) does not exist: it was removed "
                           f"after planning, or the manifest names a file that never existed (relative URIs "
                           f"are resolved against the manifest's directory): restore the file; or rerun with "
                           f"--set on_bad_input=quarantine to record it in the errors table and finish the rest "
                           f"(the finished work is kept); or fix the manifest and use a new --out") from exc
    except Exception as exc:
        raise DatasetError(f"image {record.uri!r} could not be read ({type(exc).__name__}: {exc}); "
                           f"check the path, permissions and S3 endpoint") from exc
    return _decode(data, record.uri, cfg.image_size, cfg.channels)
