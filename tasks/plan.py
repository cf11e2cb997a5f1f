"""Stage 1, plan: choose the images, split them into shards, record what the run is.

Writes to OUT (atomically, local or S3):

- ``config.yaml``: the resolved config (credentials never appear in it: sources are URIs);
- ``manifest.parquet``: one row per chosen image: position, image_id, uri, label, shard;
- ``run.json``: run_id, config_hash, number of classes, the (sigma, method) partitions, the
  shard list, library versions, host and creation time.

Resume: when OUT already holds a run, its ``config.yaml`` must have the same vote-determining
fields (``CertifyConfig.vote_fields``): then the stored plan is reused as it is (same run_id,
same shards) and only missing shards are voted. A different config is refused, never mixed in.
Alpha and radii may change between runs: they only affect the aggregate.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from densepure_core.config import CertifyConfig, resolve_source
from densepure_core.data.sources import ImageRecord, enumerate_records, select_records

from . import storage
from .faults import fault_point

__all__ = ["Plan", "ShardTask", "PlanError", "plan_run", "load_plan", "plan_summary", "shard_uri", "format_sigma"]


class PlanError(ValueError):
    """OUT holds a different run, or the plan cannot be made; the message says what to do."""


def format_sigma(sigma: float) -> str:
    return repr(float(sigma))


def shard_uri(out: str, sigma: float, method: str, shard: int) -> str:
    """``OUT/votes/sigma=<s>/method=<m>/shard=<id>.parquet`` (the data contract, docs/schema.md)."""
    return storage.join(out, "votes", f"sigma={format_sigma(sigma)}", f"method={method}", f"shard={shard:05d}.parquet")


@dataclass(frozen=True)
class ShardTask:
    """One unit of vote work: the images of one shard for one (sigma, method) partition."""

    out: str
    run_id: str
    config_hash: str
    sigma: float
    method: str
    shard: int
    records: tuple[ImageRecord, ...]

    @property
    def uri(self) -> str:
        return shard_uri(self.out, self.sigma, self.method, self.shard)


@dataclass
class Plan:
    out: str
    run_id: str
    config_hash: str
    num_classes: int
    records: list[ImageRecord]
    shards: list[list[int]]  # positions into records
    partitions: list[tuple[float, str]]  # (sigma, method label)
    resumed: bool = False

    def tasks(self) -> list[ShardTask]:
        """Every (sigma, method, shard) task, shard-major so early shards finish for all methods."""
        out = []
        for shard_id, positions in enumerate(self.shards):
            recs = tuple(self.records[p] for p in positions)
            for sigma, method in self.partitions:
                out.append(ShardTask(self.out, self.run_id, self.config_hash, sigma, method, shard_id, recs))
        return out

    def expected_images(self) -> dict[tuple[float, str], int]:
        return {p: len(self.records) for p in self.partitions}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("densepure", "torch", "diffusers", "timm", "numpy", "scipy", "prefect", "ray", "duckdb", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _local_dir(source: str) -> str | None:
    path = resolve_source(source).removeprefix("local-dir:")
    return path if os.path.exists(path) else None


def check_steps(cfg: CertifyConfig) -> dict[str, int]:
    """t* per sigma from the diffusion model's scheduler, and ``steps <= t*`` for every method.

    Done at plan time, before any worker starts, for local (and bundled) models; remote models
    are checked by the workers when they load them (purify.respaced_timesteps refuses too).
    Returns {sigma: t*} (empty if the scheduler is not local).
    """
    if cfg.diffusion is None:
        return {}
    root = _local_dir(cfg.diffusion.source)
    if root is None:
        return {}
    from diffusers import DDPMScheduler

    from densepure_core.schedule import DiffusionSchedule

    sub = "scheduler" if os.path.isdir(os.path.join(root, "scheduler")) else None
    try:
        scheduler = DDPMScheduler.from_pretrained(root, subfolder=sub)
    except (OSError, ValueError) as exc:
        raise PlanError(f"diffusion.source {cfg.diffusion.source!r}: no readable scheduler config in {root} "
                        f"({exc}); expected scheduler/scheduler_config.json (diffusers save_pretrained)") from exc
    schedule = DiffusionSchedule.from_scheduler(scheduler)
    t_stars = {}
    for sigma in cfg.sigmas:
        try:
            t_stars[repr(float(sigma))] = t = schedule.t_star(sigma, cfg.t_star_rule)
        except ValueError as exc:
            raise PlanError(f"sigmas: {exc}") from exc
        for i, m in enumerate(cfg.methods):
            if m.kind == "densepure" and m.steps > t:
                raise PlanError(f"methods.{i}.steps = {m.steps} exceeds t* = {t} (the diffusion timestep "
                                f"matching sigma {sigma}); DensePure runs at most t* reverse steps: set steps <= {t}")
    return t_stars


def model_hashes(cfg: CertifyConfig) -> dict[str, dict[str, str]]:
    """sha256 of every weights file of the local models, by source (remote: the source only)."""
    from densepure_core.models import file_sha256

    sources = {m_cfg.source for m_cfg in [cfg.classifier, *(m.classifier for m in cfg.methods if m.classifier)]}
    sources = {s.replace("{sigma}", repr(float(sig))) if "{sigma}" in s else s for s in sources for sig in cfg.sigmas}
    if cfg.diffusion is not None:
        sources.add(cfg.diffusion.source)
    out = {}
    for source in sorted(sources):
        root = _local_dir(source)
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


def load_plan(out: str) -> Plan | None:
    """The plan stored in OUT, or None if OUT holds no complete plan."""
    run_uri, manifest_uri = storage.join(out, "run.json"), storage.join(out, "manifest.parquet")
    if not (storage.exists(run_uri) and storage.exists(manifest_uri)):
        return None
    run = json.loads(storage.read_text(run_uri))
    table = pq.read_table(pa.BufferReader(storage.read_bytes(manifest_uri)))
    cols = table.to_pydict()
    records = [ImageRecord(i, u, int(lab)) for i, u, lab in zip(cols["image_id"], cols["uri"], cols["label"])]
    return Plan(out=out, run_id=run["run_id"], config_hash=run["config_hash"], num_classes=run["num_classes"],
                records=records, shards=run["shards"],
                partitions=[(float(s), m) for s, m in run["partitions"]], resumed=True)


def _check_same_run(cfg: CertifyConfig, out: str) -> None:
    stored_yaml = storage.read_text(storage.join(out, "config.yaml"))
    stored = CertifyConfig.model_validate(yaml.safe_load(stored_yaml))
    if stored.config_hash() == cfg.config_hash():
        return
    a, b = stored.vote_fields(), cfg.vote_fields()
    diff = sorted(k for k in a if a[k] != b.get(k))
    raise PlanError(f"{out} already holds a run with a different config (fields that differ: {', '.join(diff)}; "
                    f"stored config_hash {stored.config_hash()}, this one {cfg.config_hash()}). "
                    f"Results of different configs are never mixed: choose another --out, or rerun with the "
                    f"stored config ({storage.join(out, 'config.yaml')}) to resume it.")


def plan_run(cfg: CertifyConfig, out: str | None = None) -> Plan:
    """Make (or reload) the plan of ``cfg`` in ``out`` (default ``cfg.out``)."""
    out = out or cfg.out
    if storage.exists(storage.join(out, "config.yaml")):
        _check_same_run(cfg, out)
        existing = load_plan(out)
        if existing is not None:
            return existing
        # config.yaml written but the plan was interrupted before run.json: plan again below.
    t_stars = check_steps(cfg)
    records, num_classes = enumerate_records(cfg.dataset)
    chosen = select_records(records, cfg.dataset)
    if cfg.classifier.num_classes and cfg.classifier.num_classes != num_classes:
        raise PlanError(f"classifier.num_classes is {cfg.classifier.num_classes} but the dataset has "
                        f"{num_classes} classes; fix classifier.num_classes or the dataset")
    shards = [list(range(i, min(i + cfg.shard_size, len(chosen)))) for i in range(0, len(chosen), cfg.shard_size)]
    partitions = [(float(s), m.label) for s in cfg.sigmas for m in cfg.methods]
    run_id = f"{cfg.run_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    plan = Plan(out, run_id, cfg.config_hash(), num_classes, chosen, shards, partitions)

    # config.yaml first: a process killed after it and before run.json re-plans identically.
    storage.write_text_atomic(storage.join(out, "config.yaml"), cfg.model_copy(update={"out": out}).to_yaml())
    fault_point("plan:after-config")
    manifest = pa.table({
        "position": pa.array(range(len(chosen)), pa.int32()),
        "image_id": [r.image_id for r in chosen],
        "uri": [r.uri for r in chosen],
        "label": pa.array([r.label for r in chosen], pa.int32()),
        "shard": pa.array([p // cfg.shard_size for p in range(len(chosen))], pa.int32()),
    })
    storage.write_parquet_atomic(storage.join(out, "manifest.parquet"), manifest)
    run = {
        "run_id": run_id, "config_hash": plan.config_hash, "num_classes": num_classes,
        "images": len(chosen), "shards": shards, "partitions": [list(p) for p in partitions],
        "t_star": t_stars, "model_hashes": model_hashes(cfg),
        "host": socket.gethostname(), "created_at": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(),
    }
    # run.json last: its presence marks a complete plan.
    storage.write_text_atomic(storage.join(out, "run.json"), json.dumps(run, indent=2))
    return plan


def plan_summary(plan: Plan) -> dict:
    return {"run_id": plan.run_id, "images": len(plan.records), "shards": len(plan.shards),
            "partitions": len(plan.partitions), "resumed": plan.resumed}

