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
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from densepure_core.config import CertifyConfig, MethodConfig
from densepure_core.data.sources import ImageRecord, enumerate_records, select_records
from densepure_core.models import ModelLoadError
from densepure_core.rng import STREAM_VERSION
from tasks.certify.models import RunModels
from tasks.common.models import ModelChangedError
from tasks.common.faults import fault_point
from tasks.common.layout import format_sigma
from tasks.common.planning import (
    PlanError,
    check_files_exist,
    check_labels,
    differing_fields,
    library_versions,
    changed_partitions_error,
    fields_hash,
    flat_fields,
    shard_positions,
    source_hashes,
    with_fingerprints,
    write_manifest,
)
from tasks.common.run_dir import RunDir
from tasks.common.workers import BadInputError, image_fit_problem

__all__ = ["Plan", "ShardTask", "PlanError", "plan_run", "load_plan", "plan_summary", "record_published_tables",
           "partition_key", "partition_hashes", "voted_partitions"]


log = logging.getLogger("densepure.plan")


@dataclass(frozen=True)
class ShardTask:
    """One unit of vote work: the images of one shard for one (sigma, method) partition.

    ``config_hash`` is the partition's hash (:func:`partition_hashes`), written into each row.
    """

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
    partition_hashes: dict[str, str] = field(default_factory=dict)  # partition_key -> hash
    fingerprints: dict[str, str] = field(default_factory=dict)  # model source -> weights' fingerprint

    def tasks(self) -> list[ShardTask]:
        """Every (sigma, method, shard) task, shard-major so early shards finish for all methods."""
        out = []
        for shard_id, positions in enumerate(self.shards):
            recs = tuple(self.records[p] for p in positions)
            for sigma, method in self.partitions:
                identity = self.partition_hashes.get(partition_key(sigma, method), self.config_hash)
                out.append(ShardTask(self.run, self.run_id, identity, sigma, method, shard_id, recs))
        return out

    def expected_images(self) -> dict[tuple[float, str], int]:
        return {p: len(self.records) for p in self.partitions}


def _load_models(cfg: CertifyConfig, expected: dict[str, str] | None = None) -> RunModels:
    """Every model of every partition, loaded on the driver's CPU as the workers will load them:
    a source that points nowhere, a broken checkpoint or weights replaced since the plan fail
    here, before anything is written or any partition votes (tasks/certify/models.py)."""
    models = RunModels(cfg.model_copy(update={"device": "cpu"}), torch.device("cpu"),
                       cfg.classifier.num_classes, expected=expected)
    try:
        models.load_all()
    except ModelChangedError as exc:
        raise PlanError(str(exc)) from None
    except (ModelLoadError, BadInputError) as exc:
        raise PlanError(f"{exc} (checked before anything runs)") from None
    return models


def check_steps(cfg: CertifyConfig, models: RunModels) -> dict[str, int]:
    """t* per sigma from the diffusion model's scheduler, and ``steps <= t*`` for every method.
    Returns ``{sigma: t*}`` (empty when no method uses the diffusion model)."""
    if not any(m.kind != "rs" for m in cfg.methods):
        return {}
    schedule = models.run_diffusion()[1]
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


def check_model_inputs(cfg: CertifyConfig, models: RunModels) -> None:
    """Refuse images with the wrong channels or size for the diffusion model, before Ray starts."""
    if not any(m.kind != "rs" for m in cfg.methods):
        return
    unet = models.run_diffusion()[0].unet.config
    size = unet.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = 1 if cfg.dataset.kind == "digits" else (cfg.dataset.channels or 3)
    image_size = cfg.dataset.image_size
    problem = image_fit_problem(channels, (image_size, image_size) if image_size else None,
                                int(unet.in_channels), size)
    if problem:
        raise PlanError(f"the images of dataset {cfg.dataset.path or cfg.dataset.kind!r} are read with "
                        f"{problem} (diffusion.source {cfg.diffusion.source}; checked before anything runs)")


def model_hashes(cfg: CertifyConfig) -> dict[str, dict[str, str]]:
    """sha256 of every weights file of the local models, by source (remote: the source only)."""
    sources = {m_cfg.source for m_cfg in [cfg.classifier, *(m.classifier for m in cfg.methods if m.classifier)]}
    sources = {s.replace("{sigma}", format_sigma(sig)) if "{sigma}" in s else s for s in sources for sig in cfg.sigmas}
    if cfg.diffusion is not None:
        sources.add(cfg.diffusion.source)
    return source_hashes(sources)


def partition_key(sigma: float, method: str) -> str:
    """A partition's key in run.json: ``<s>/<m>`` (the two path pieces of its vote files)."""
    return f"{format_sigma(sigma)}/{method}"


def _partition_fields(cfg: CertifyConfig, sigma: float, method: MethodConfig,
                      fingerprints: dict[str, str]) -> dict:
    """:meth:`CertifyConfig.partition_fields` with each model source replaced by its weights'
    fingerprint: the same weights read from another place vote the same counts."""
    return with_fingerprints(cfg.partition_fields(sigma, method), fingerprints)


def partition_hashes(cfg: CertifyConfig, fingerprints: dict[str, str]) -> dict[str, str]:
    """``{partition key: hash}``: each partition's identity, the hash of what its votes depend on
    (:func:`_partition_fields`). It is the ``config_hash`` of every vote and errors row of the
    partition, and what a resumed run compares."""
    return {partition_key(sigma, m.label): fields_hash(_partition_fields(cfg, sigma, m, fingerprints))
            for sigma in cfg.sigmas for m in cfg.methods}


def load_plan(out: RunDir | str) -> Plan | None:
    """The plan stored in OUT, or None if OUT holds no complete plan."""
    run = RunDir.of(out)
    if not (run.exists(run.run_uri) and run.exists(run.manifest_uri)):
        return None
    meta = run.read_run()
    table = pq.read_table(pa.BufferReader(run.read_bytes(run.manifest_uri)))
    cols = table.to_pydict()
    records = [ImageRecord(i, u, int(lab)) for i, u, lab in zip(cols["image_id"], cols["uri"], cols["label"])]
    partitions = [(float(s), m) for s, m in meta["partitions"]]
    # run.json before partition hashes: every partition's rows carry the run's config_hash
    hashes = meta.get("partition_hashes") or {partition_key(s, m): meta["config_hash"] for s, m in partitions}
    return Plan(run=run, run_id=meta["run_id"], config_hash=meta["config_hash"], num_classes=meta["num_classes"],
                records=records, shards=meta["shards"], partitions=partitions, resumed=True,
                partition_hashes=hashes, fingerprints=meta.get("model_fingerprints") or {})


def voted_partitions(run: RunDir) -> set[str]:
    """The keys of the partitions that have a vote or errors file under OUT."""
    keys = set()
    for uri in run.list_files(run.votes_dir, ".parquet") + run.error_files():
        parts = dict(p.split("=", 1) for p in uri.replace("\\", "/").split("/")[-3:-1] if "=" in p)
        if "sigma" in parts and "method" in parts:
            keys.add(f"{parts['sigma']}/{parts['method']}")
    return keys


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


def _check_stream_version(run: RunDir, stored: CertifyConfig, meta: dict) -> None:
    """Refuse an OUT voted with other noise streams, or whose run.json and config.yaml disagree.

    An OUT planned by a release before the stream version existed (run.json's config_hash is
    the stored config's version-1 hash) drew its noise from 32-bit seeded generators, so its
    counts cannot be completed with new ones. Its results stay readable; the run is not resumed.
    """
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


def _refuse_changed_files(run: RunDir, cfg: CertifyConfig, meta: dict) -> None:
    """An OUT planned before fingerprints existed: its local weights files must hash as planned."""
    stored = meta.get("model_hashes") or {}
    now = model_hashes(cfg)
    for source, files in stored.items():
        if files and source in now and now[source] != files:
            changed = sorted(f for f in set(files) | set(now[source]) if files.get(f) != now[source].get(f))
            raise PlanError(f"the model {source} changed since {run} was voted: its weights file(s) {changed} no "
                            f"longer hash as run.json recorded (sha256 then {files.get(changed[0], 'absent')[:16]}, "
                            f"now {now[source].get(changed[0], 'absent')[:16]}). Votes of different models are "
                            f"never mixed: certify into a new --out (or restore the model).")


def _legacy_resume(cfg: CertifyConfig, run: RunDir, stored: CertifyConfig, meta: dict) -> Plan:
    """Resume an OUT planned before partition hashes: the whole config must be the same."""
    if stored.config_hash() != cfg.config_hash():
        diff = differing_fields(stored, cfg)
        raise PlanError(f"{run} already holds a run with a different config (fields that differ: {', '.join(diff)}; "
                        f"stored config_hash {stored.config_hash()}, this one {cfg.config_hash()}). "
                        f"Results of different configs are never mixed: choose another --out, or rerun with the "
                        f"stored config ({run.config_uri}) to resume it.")
    _refuse_changed_files(run, cfg, meta)
    return load_plan(run)


def _continue(cfg: CertifyConfig, run: RunDir, stored: CertifyConfig, meta: dict) -> Plan:
    """Resume (or extend) a run with votes: every voted partition must keep its identity.

    A change that touches only partitions without votes (a corrected source or setting, an added
    sigma or method) continues the run: same run_id, same images and shards; the new partitions
    are voted, the voted ones kept. A change to a voted partition is refused, naming it.
    """
    planned_fps = meta.get("model_fingerprints") or {}
    voted = voted_partitions(run)
    # The models of voted partitions must be the ones they were voted with.
    voted_sources = {}
    for sigma in stored.sigmas:
        for m in stored.methods:
            if partition_key(sigma, m.label) in voted:
                voted_sources[stored.classifier_for(m, sigma).source] = partition_key(sigma, m.label)
                if m.kind != "rs":
                    voted_sources[stored.diffusion.source] = partition_key(sigma, m.label)
    models = _load_models(cfg, expected={s: fp for s, fp in planned_fps.items() if s in voted_sources})
    fingerprints = {**planned_fps, **models.fingerprints}
    new_hashes = partition_hashes(cfg, fingerprints)
    old_hashes = meta["partition_hashes"]
    changed = sorted(k for k in voted if k in new_hashes and new_hashes[k] != old_hashes.get(k))
    removed = sorted(k for k in voted if k not in new_hashes)
    if changed:
        by_key = {partition_key(s, m.label): (s, m) for s in cfg.sigmas for m in cfg.methods}
        old_by_key = {partition_key(s, m.label): (s, m) for s in stored.sigmas for m in stored.methods}
        diff: set[str] = set()
        for key in changed:
            a = flat_fields(_partition_fields(stored, *old_by_key[key], planned_fps)) if key in old_by_key else {}
            b = flat_fields(_partition_fields(cfg, *by_key[key], fingerprints))
            diff |= {f for f in set(a) | set(b) if a.get(f) != b.get(f)}
        raise changed_partitions_error(run, changed, diff, "votes", "sigmas or methods")
    plan = load_plan(run)
    same = stored.config_hash() == cfg.config_hash()
    if same and not removed:
        return plan
    # The dataset and shard layout are part of every partition's identity, so the manifest holds.
    partitions = [(float(s), m.label) for s in cfg.sigmas for m in cfg.methods]
    added = [partition_key(*p) for p in partitions if partition_key(*p) not in old_hashes]
    plan.partitions, plan.partition_hashes, plan.fingerprints = partitions, new_hashes, fingerprints
    plan.config_hash = cfg.config_hash()
    run.write_text(run.config_uri, cfg.model_copy(update={"out": run.root}).to_yaml())
    meta.update({"config_hash": plan.config_hash, "partitions": [list(p) for p in partitions],
                 "partition_hashes": new_hashes, "model_fingerprints": fingerprints,
                 "t_star": {**meta.get("t_star", {}), **check_steps(cfg, models)},
                 "model_hashes": {**meta.get("model_hashes", {}), **model_hashes(cfg)}})
    meta.setdefault("extended", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                            "added": added, "config_hash": plan.config_hash})
    run.write_run(meta)
    log.warning("%s: continuing run %s with this config (%d partition(s) added: %s; voted partitions kept)", run,
                plan.run_id, len(added), ", ".join(added) or "none")
    return plan


def plan_run(cfg: CertifyConfig, out: RunDir | str | None = None) -> Plan:
    """Make (or reload, or extend) the plan of ``cfg`` in ``out`` (default ``cfg.out``)."""
    run = RunDir.of(out or cfg.out)
    stored_data = run.read_config()
    if stored_data is not None:
        _check_same_job(run)
        meta = run.read_run()
        if meta is not None and not _nothing_voted(run):
            stored = CertifyConfig.model_validate(stored_data)
            _check_stream_version(run, stored, meta)
            if "partition_hashes" not in meta:
                return _legacy_resume(cfg, run, stored, meta)
            return _continue(cfg, run, stored, meta)
        # Only a plan: a failed run stopped before its first shard (or the plan was interrupted
        # before run.json). The user's fix (a corrected config, manifest or dataset) is planned
        # afresh instead of being refused as "a different config" or checked against the stale
        # manifest.
        log.warning("%s holds a plan but no votes yet: planning again from this config and dataset", run)
    models = _load_models(cfg)
    t_stars = check_steps(cfg, models)
    check_model_inputs(cfg, models)
    fingerprints = dict(models.fingerprints)
    # The dataset's own class count (max label + 1 for a manifest) decides nothing: a subset
    # may lack classes and a manifest may have no labels at all. The classifier's width does.
    records, _ = enumerate_records(cfg.dataset)
    chosen = select_records(records, cfg.dataset)
    check_files_exist(chosen, cfg.on_bad_input)
    num_classes = cfg.classifier.num_classes
    width = num_classes or models.num_classes
    check_labels(chosen, width, f"classifier.num_classes: {num_classes}" if num_classes
                 else f"the output width of {cfg.classifier.source}", PlanError)
    shards = shard_positions(len(chosen), cfg.shard_size)
    partitions = [(float(s), m.label) for s in cfg.sigmas for m in cfg.methods]
    hashes = partition_hashes(cfg, fingerprints)
    run_id = f"{cfg.run_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    plan = Plan(run, run_id, cfg.config_hash(), num_classes, chosen, shards, partitions,
                partition_hashes=hashes, fingerprints=fingerprints)

    # config.yaml first: a process killed after it and before run.json re-plans identically.
    run.write_text(run.config_uri, cfg.model_copy(update={"out": run.root}).to_yaml())
    fault_point("plan:after-config")
    write_manifest(run, chosen, cfg.shard_size)
    meta = {
        "run_id": run_id, "config_hash": plan.config_hash, "stream_version": STREAM_VERSION,
        "num_classes": num_classes, "images": len(chosen), "shards": shards, "partitions": [list(p) for p in partitions],
        "partition_hashes": hashes, "model_fingerprints": fingerprints,
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
