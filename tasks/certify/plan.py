"""Stage 1, plan: choose the images, split them into shards, record what the run is.

Writes to OUT (atomically, local or S3):

- ``config.yaml``: the resolved config (credentials never appear in it: sources are URIs);
- ``manifest.parquet``: one row per chosen image: position, image_id, uri, label, shard;
- ``run.json``: run_id, config_hash, number of classes (``classifier.num_classes``; null when
  not set: the vote workers take it from the classifier's output width), the (sigma, method)
  partitions, the shard list, library versions, host and creation time.

The classifier's output width decides the length of the count vectors, never the labels: a
dataset may hold any subset of the classes, or only unknown labels (-1). With
``classifier.num_classes`` set, every label is checked against it here; without, the vote
workers check each shard's labels against the width of the classifier they load.

Resume: when OUT already holds a run, its ``config.yaml`` must have the same vote-determining
fields (``CertifyConfig.vote_fields``): then the stored plan is reused as it is (same run_id,
same shards) and only missing shards are voted. A different config is refused, never mixed in.
Alpha and radii may change between runs: they only affect the aggregate. Whenever the tables
are published, :func:`record_published_tables` writes their alpha and radii into ``config.yaml``
and ``run.json`` (``tables``), so both always say which alpha the published tables use.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from densepure_core.config import CertifyConfig
from densepure_core.data.sources import ImageRecord, enumerate_records, select_records
from densepure_core.rng import STREAM_VERSION
from tasks.common.faults import fault_point
from tasks.common.layout import format_sigma
from tasks.common.planning import (
    PlanError,
    check_files_exist,
    check_labels,
    differing_fields,
    library_versions,
    local_model_dir,
    local_model_json,
    shard_positions,
    source_hashes,
    write_manifest,
)
from tasks.common.run_dir import RunDir
from tasks.common.workers import image_fit_problem

__all__ = ["Plan", "ShardTask", "PlanError", "plan_run", "load_plan", "plan_summary", "record_published_tables"]


log = logging.getLogger("densepure.plan")


@dataclass(frozen=True)
class ShardTask:
    """One unit of vote work: the images of one shard for one (sigma, method) partition."""

    run: RunDir
    run_id: str
    config_hash: str
    sigma: float
    method: str
    shard: int
    records: tuple[ImageRecord, ...]

    @property
    def uri(self) -> str:
        """The shard's vote file."""
        return self.run.shard_uri(self.sigma, self.method, self.shard)

    @property
    def errors_uri(self) -> str:
        """The shard's errors file (quarantined images)."""
        return self.run.errors_uri(self.sigma, self.method, self.shard)


@dataclass
class Plan:
    run: RunDir
    run_id: str
    config_hash: str
    num_classes: int | None  # classifier.num_classes; None: the classifier's output width
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
                out.append(ShardTask(self.run, self.run_id, self.config_hash, sigma, method, shard_id, recs))
        return out

    def expected_images(self) -> dict[tuple[float, str], int]:
        return {p: len(self.records) for p in self.partitions}


def check_steps(cfg: CertifyConfig) -> dict[str, int]:
    """t* per sigma from the diffusion model's scheduler, and ``steps <= t*`` for every method.

    Done at plan time, before any worker starts, for local (and bundled) models; remote models
    are checked by the workers when they load them (purify.respaced_timesteps refuses too).
    Returns {sigma: t*} (empty if the scheduler is not local).
    """
    if cfg.diffusion is None:
        return {}
    root = local_model_dir(cfg.diffusion.source)
    if root is None:
        return {}
    from diffusers import DDPMScheduler

    from densepure_core.diffusion.schedule import DiffusionSchedule

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
            t_stars[format_sigma(sigma)] = t = schedule.t_star(sigma, cfg.t_star_rule)
        except ValueError as exc:
            raise PlanError(f"sigmas: {exc}") from exc
        for i, m in enumerate(cfg.methods):
            if m.kind == "densepure" and m.steps > t:
                raise PlanError(f"methods.{i}.steps = {m.steps} exceeds t* = {t} (the diffusion timestep "
                                f"matching sigma {sigma}); DensePure runs at most t* reverse steps: set steps <= {t}")
    return t_stars


def check_model_inputs(cfg: CertifyConfig) -> None:
    """Refuse at plan time, before Ray starts, what the local models show cannot work: images with
    the wrong channels or size for the diffusion model, labels the classifier cannot output.

    Only local (and bundled) models are read here, and only their small JSON configs; remote
    ones are checked by the workers when they load them (same messages).
    """
    if cfg.diffusion is not None and any(m.kind != "rs" for m in cfg.methods):
        unet = local_model_json(cfg.diffusion.source, "unet/config.json", "config.json")
        if "in_channels" in unet:
            size = unet.get("sample_size")
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size) if size else None
            channels = 1 if cfg.dataset.kind == "digits" else (cfg.dataset.channels or 3)
            image_size = cfg.dataset.image_size
            problem = image_fit_problem(channels, (image_size, image_size) if image_size else None,
                                        int(unet["in_channels"]), size)
            if problem:
                raise PlanError(f"the images of dataset {cfg.dataset.path or cfg.dataset.kind!r} are read with "
                                f"{problem} (diffusion.source {cfg.diffusion.source}; checked before anything "
                                f"runs)")


def classifier_width(source: str) -> int | None:
    """The output width a local classifier's config declares (timm / Hugging Face config.json), or None."""
    config = local_model_json(source, "config.json")
    width = config.get("num_classes", config.get("num_labels"))
    return int(width) if isinstance(width, int) and width > 0 else None


def model_hashes(cfg: CertifyConfig) -> dict[str, dict[str, str]]:
    """sha256 of every weights file of the local models, by source (remote: the source only)."""
    sources = {m_cfg.source for m_cfg in [cfg.classifier, *(m.classifier for m in cfg.methods if m.classifier)]}
    sources = {s.replace("{sigma}", format_sigma(sig)) if "{sigma}" in s else s for s in sources for sig in cfg.sigmas}
    if cfg.diffusion is not None:
        sources.add(cfg.diffusion.source)
    return source_hashes(sources)


def load_plan(out: RunDir | str) -> Plan | None:
    """The plan stored in OUT, or None if OUT holds no complete plan."""
    run = RunDir.of(out)
    if not (run.exists(run.run_uri) and run.exists(run.manifest_uri)):
        return None
    meta = run.read_run()
    table = pq.read_table(pa.BufferReader(run.read_bytes(run.manifest_uri)))
    cols = table.to_pydict()
    records = [ImageRecord(i, u, int(lab)) for i, u, lab in zip(cols["image_id"], cols["uri"], cols["label"])]
    return Plan(run=run, run_id=meta["run_id"], config_hash=meta["config_hash"], num_classes=meta["num_classes"],
                records=records, shards=meta["shards"],
                partitions=[(float(s), m) for s, m in meta["partitions"]], resumed=True)


def _nothing_voted(run: RunDir) -> bool:
    """Whether OUT holds no vote and no errors file: nothing a new plan could contradict."""
    return not run.list_files(run.votes_dir, ".parquet") and not run.error_files()


def _check_same_job(run: RunDir) -> None:
    """Refuse an OUT that holds another job (an attack evaluation or a training)."""
    job = run.job()
    if job not in (None, "certify"):
        what = "an attack evaluation" if job == "attack" else f"a {job} run"
        raise PlanError(f"{run} holds {what} (densepure {job}); a certification run needs its own "
                        f"OUT: choose another --out")


def _check_same_run(cfg: CertifyConfig, run: RunDir) -> None:
    """Refuse to resume OUT unless it holds the votes ``cfg`` would compute.

    Besides the config's votes fields, the noise streams must be the same version: an OUT
    planned by a release before the stream version existed (run.json's config_hash is the
    stored config's version-1 hash) drew its noise from 32-bit seeded generators, so its counts
    cannot be completed with new ones. Its results stay readable; the run is not resumed.
    """
    _check_same_job(run)
    stored = CertifyConfig.model_validate(run.read_config())
    meta = run.read_run()
    if meta is not None:  # absent: the plan was cut short before anything was voted
        recorded, version = meta.get("config_hash"), meta.get("stream_version")
        if version is None and recorded is not None and recorded != stored.config_hash():
            version = next((v for v in range(1, STREAM_VERSION)
                            if stored.config_hash(stream_version=v) == recorded), None)
            version = STREAM_VERSION if version is None else version  # unknown: refused below
        if version is not None and version != STREAM_VERSION:
            raise PlanError(f"{run} was voted with noise stream version {version} and this densepure draws "
                            f"version {STREAM_VERSION} (field that differs: stream_version; version 1 seeded "
                            f"torch generators with only 32 of the seed's 63 bits). Its counts cannot be "
                            f"resumed or mixed with new ones: use a new --out (the old results stay readable "
                            f"with densepure sql/report).")
        if recorded is not None and recorded != stored.config_hash():
            raise PlanError(f"{run}: run.json's config_hash {recorded} is not the hash of its config.yaml "
                            f"({stored.config_hash()}): written by another densepure version or edited. "
                            f"Results are never mixed: choose a new --out.")
    if stored.config_hash() == cfg.config_hash():
        return
    diff = differing_fields(stored, cfg)
    raise PlanError(f"{run} already holds a run with a different config (fields that differ: {', '.join(diff)}; "
                    f"stored config_hash {stored.config_hash()}, this one {cfg.config_hash()}). "
                    f"Results of different configs are never mixed: choose another --out, or rerun with the "
                    f"stored config ({run.config_uri}) to resume it.")


def plan_run(cfg: CertifyConfig, out: RunDir | str | None = None) -> Plan:
    """Make (or reload) the plan of ``cfg`` in ``out`` (default ``cfg.out``)."""
    run = RunDir.of(out or cfg.out)
    if run.exists(run.config_uri):
        if _nothing_voted(run):
            # Only a plan: a failed run stopped before its first shard. The user's fix (a
            # corrected config, manifest or dataset) is planned afresh instead of being refused
            # as "a different config" or checked against the stale manifest.
            _check_same_job(run)
            log.warning("%s holds a plan but no votes yet: planning again from this config and dataset", run)
        else:
            _check_same_run(cfg, run)
            existing = load_plan(run)
            if existing is not None:
                return existing
        # config.yaml written but the plan was interrupted before run.json: plan again below.
    t_stars = check_steps(cfg)
    check_model_inputs(cfg)
    # The dataset's own class count (max label + 1 for a manifest) decides nothing: a subset
    # may lack classes and a manifest may have no labels at all. The classifier's width does.
    records, _ = enumerate_records(cfg.dataset)
    chosen = select_records(records, cfg.dataset)
    check_files_exist(chosen, cfg.on_bad_input)
    num_classes = cfg.classifier.num_classes
    if num_classes:
        check_labels(chosen, num_classes, f"classifier.num_classes: {num_classes}", PlanError)
    else:  # the classifier's own width, when its local config says it: no Ray start to find out
        for sigma in cfg.sigmas:
            for m in cfg.methods:
                source = cfg.classifier_for(m, sigma).source.replace("{sigma}", format_sigma(sigma))
                width = classifier_width(source)
                if width:
                    check_labels(chosen, width, f"the output width of {source}", PlanError)
    shards = shard_positions(len(chosen), cfg.shard_size)
    partitions = [(float(s), m.label) for s in cfg.sigmas for m in cfg.methods]
    run_id = f"{cfg.run_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    plan = Plan(run, run_id, cfg.config_hash(), num_classes, chosen, shards, partitions)

    # config.yaml first: a process killed after it and before run.json re-plans identically.
    run.write_text(run.config_uri, cfg.model_copy(update={"out": run.root}).to_yaml())
    fault_point("plan:after-config")
    write_manifest(run, chosen, cfg.shard_size)
    meta = {
        "run_id": run_id, "config_hash": plan.config_hash, "stream_version": STREAM_VERSION,
        "num_classes": num_classes, "images": len(chosen), "shards": shards, "partitions": [list(p) for p in partitions],
        "t_star": t_stars, "model_hashes": model_hashes(cfg),
        "host": socket.gethostname(), "created_at": datetime.now(timezone.utc).isoformat(),
        "versions": library_versions(),
    }
    # run.json last: its presence marks a complete plan.
    run.write_run(meta)
    return plan


def plan_summary(plan: Plan) -> dict:
    return {"run_id": plan.run_id, "images": len(plan.records), "shards": len(plan.shards),
            "partitions": len(plan.partitions), "resumed": plan.resumed}


def record_published_tables(out: RunDir | str, alpha: float, radii: list[float]) -> None:
    """Write the alpha and radii of the tables just published into ``config.yaml`` and ``run.json``.

    A rerun with another alpha re-aggregates the same votes (alpha is no vote field, so the plan
    resumes), and the tables then hold the new alpha; config.yaml kept the first run's, so it
    contradicted them. Only these two operational fields change: the config hash, and with it
    resuming, stays as it was. ``run.json`` gains ``tables: {alpha, radii, published_at}``.
    Each file is rewritten atomically; OUTs without a plan (tables built by hand) are left alone.
    """
    run = RunDir.of(out)
    config, meta = run.read_config(), run.read_run()
    if config is None or meta is None:
        return
    stored = CertifyConfig.model_validate(config)
    if stored.alpha != alpha or stored.radii != list(radii):
        run.write_text(run.config_uri, stored.model_copy(update={"alpha": alpha, "radii": list(radii)}).to_yaml())
    meta["tables"] = {"alpha": alpha, "radii": list(radii),
                      "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    run.write_run(meta)
