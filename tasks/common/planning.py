"""What the plan stage of every job shares: its error type, the manifest, the checks of labels and
files that run before anything is written, the weights' hashes and library versions of run.json,
and the fields on which a refused config differs from the stored one.

Imports :mod:`densepure_core` and :mod:`tasks.common` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform

import pyarrow as pa

from densepure_core.config import resolve_source
from densepure_core.data.sources import missing_files
from tasks.common.run_dir import RunDir

__all__ = ["PlanError", "library_versions", "local_model_dir", "source_hashes", "with_fingerprints", "fields_hash",
           "flat_fields", "changed_partitions_error",
           "differing_fields", "shard_positions", "write_manifest", "check_files_exist", "check_labels"]

log = logging.getLogger("densepure.plan")


class PlanError(ValueError):
    """OUT holds a different run, or the plan cannot be made; the message says what to do."""


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("densepure", "torch", "diffusers", "timm", "numpy", "scipy", "prefect", "ray", "duckdb", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def local_model_dir(source: str) -> str | None:
    path = resolve_source(source).removeprefix("local-dir:")
    return path if os.path.exists(path) else None


def source_hashes(sources) -> dict[str, dict[str, str]]:
    """{source: {weights file: sha256}} for local sources ({} for remote ones)."""
    from densepure_core.models import file_sha256

    out = {}
    for source in sorted(sources):
        root = local_model_dir(source)
        files = {}
        if root and os.path.isdir(root):
            for dirpath, _, names in os.walk(root):
                for name in sorted(names):
                    if name.endswith((".safetensors", ".bin", ".pth", ".pt", ".ckpt")):
                        full = os.path.join(dirpath, name)
                        files[os.path.relpath(full, root)] = file_sha256(full)
        elif root:
            files[os.path.basename(root)] = file_sha256(root)
        out[source] = files
    return out


def differing_fields(stored, cfg) -> list[str]:
    """The ``votes`` fields (top level) on which two configs of one job differ, sorted: what a
    refusal to resume an OUT with another config names."""
    a, b = stored.vote_fields(), cfg.vote_fields()
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def shard_positions(images: int, shard_size: int) -> list[list[int]]:
    """Positions 0..images-1 cut into consecutive shards of ``shard_size`` (the last may be shorter)."""
    return [list(range(i, min(i + shard_size, images))) for i in range(0, images, shard_size)]


def write_manifest(run: RunDir, chosen, shard_size: int) -> None:
    """Publish ``OUT/manifest.parquet``: position, image_id, uri, label, shard of every chosen image."""
    manifest = pa.table({
        "position": pa.array(range(len(chosen)), pa.int32()),
        "image_id": [r.image_id for r in chosen],
        "uri": [r.uri for r in chosen],
        "label": pa.array([r.label for r in chosen], pa.int32()),
        "shard": pa.array([p // shard_size for p in range(len(chosen))], pa.int32()),
    })
    run.write_parquet(run.manifest_uri, manifest)


def check_files_exist(records, on_bad_input: str) -> None:
    """Refuse, before anything is written, images whose local file or S3 object does not exist
    (under ``on_bad_input: fail``); under ``quarantine`` the workers record them in the errors table."""
    missing = missing_files(list(records))
    if missing and on_bad_input == "fail":
        first = missing[0]
        raise PlanError(f"{len(missing)} image file(s) of the dataset do not exist, e.g. {first.uri!r} (image_id "
                        f"{first.image_id!r}); relative manifest URIs are resolved against the manifest's directory. "
                        f"Fix the paths (or remove those rows), or set on_bad_input: quarantine to record them in "
                        f"the errors table and certify the rest.")
    if missing:
        log.warning("%d image file(s) do not exist (e.g. %s); they will be quarantined", len(missing), missing[0].uri)


def check_labels(records, num_classes: int, what: str, error=ValueError) -> None:
    """Refuse labels that are neither -1 (unknown) nor a class index below ``num_classes``.

    Args:
        records: ImageRecords (image_id, uri, label).
        num_classes: the classifier's output width.
        what: where the width comes from, for the message (e.g. ``classifier.num_classes``).
        error: the exception type to raise.
    """
    bad = [r for r in records if not -1 <= r.label < num_classes]
    if bad:
        first = bad[0]
        raise error(
            f"image {first.image_id!r} ({first.uri}) has label {first.label}, but the classifier has "
            f"{num_classes} outputs ({what}): a label must be -1 (unknown) or one of the classifier's class "
            f"indices 0..{num_classes - 1} ({len(bad)} image(s) out of range). Fix the labels (a manifest's "
            f"label column, or dataset.classes_file to map the folders to the classifier's class order; -1 "
            f"where unknown), or, if it is the wrong classifier, point classifier.source at the one trained "
            f"on these classes.")


# -- partition identity: what a partition's results depend on ------------------------------------

def with_fingerprints(fields: dict, fingerprints: dict[str, str]) -> dict:
    """A partition's fields (``classifier`` and ``diffusion`` sections with a ``source``) with each
    model source replaced by its weights' fingerprint: the same weights read from another place
    give the same results, other weights under the same name do not."""
    for section in ("classifier", "diffusion"):
        if fields.get(section) is not None:
            source = fields[section].pop("source")
            fields[section]["fingerprint"] = fingerprints.get(source, f"unknown ({source})")
    return fields


def fields_hash(fields: dict) -> str:
    """sha256 (first 16 hex digits) of a partition's fields: its identity."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def flat_fields(fields: dict, prefix: str = "") -> dict:
    """Nested sections as dotted names (``classifier.fingerprint``), for naming what differs."""
    out = {}
    for key, value in fields.items():
        if isinstance(value, dict) and key not in ("bound_params",):
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed_partitions_error(run, changed: list[str], diff: set[str], rows: str, extendable: str) -> PlanError:
    """The refusal of a config that changes partitions which already hold ``rows``."""
    return PlanError(
        f"{run} already holds a run with a different config: its {rows} of partition(s) {', '.join(changed)} "
        f"depend on fields this config changes (fields that differ: {', '.join(sorted(diff))}). Results of "
        f"different settings are never mixed: choose another --out, or rerun with the stored config "
        f"({run.config_uri}) to resume it. Partitions without {rows} may change, and {extendable} may be added, "
        f"on the same OUT.")
