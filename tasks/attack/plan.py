"""Stage 1 of ``densepure attack``: choose the images, split them into shards, record the run.

Writes to OUT, as the certification plan does (tasks/certify/plan.py), atomically, local or S3:
``config.yaml`` (the resolved :class:`~densepure_core.config.attack.AttackConfig`, ``job:
attack``), ``manifest.parquet`` (position, image_id, uri, label, shard) and, last,
``run.json`` (run_id, config_hash, stream_version, the (defense, threat, attack) partitions,
the shards, t* per purifying defense, model hashes, versions, host, time).

Resume: an OUT holding the same config (same hash) reuses its plan, and only missing shards
run; a different config, or a certification run, is refused with the way out.

Checked here, before any worker starts: every label is a class index (an attack needs the true
label: -1 is refused), and, for local diffusion models, t* and the step count of every
purifying defense.
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

from densepure_core.config.attack import AttackConfig, DefenseConfig
from densepure_core.data.sources import ImageRecord, enumerate_records, select_records
from densepure_core.models import ModelLoadError
from densepure_core.rng import STREAM_VERSION
from tasks.common.faults import fault_point
from tasks.common.models import LoadedModels, ModelChangedError
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

__all__ = ["AttackTask", "AttackPlan", "plan_attack", "load_attack_plan", "defense_t_star", "check_defenses"]

log = logging.getLogger("densepure.plan")


@dataclass(frozen=True)
class AttackTask:
    """One unit of attack work: the images of one shard for one (defense, threat, attack)."""

    run: RunDir
    run_id: str
    config_hash: str
    defense: str
    threat: str
    attack: str
    shard: int
    records: tuple[ImageRecord, ...]

    @property
    def uri(self) -> str:
        return self.run.attack_shard_uri(self.defense, self.threat, self.attack, self.shard)

    @property
    def errors_uri(self) -> str:
        return self.run.attack_errors_uri(self.defense, self.threat, self.attack, self.shard)


@dataclass
class AttackPlan:
    run: RunDir
    run_id: str
    config_hash: str
    records: list[ImageRecord]
    shards: list[list[int]]
    partitions: list[tuple[str, str, str]]
    resumed: bool = False
    partition_hashes: dict[str, str] = field(default_factory=dict)  # partition_key -> hash
    fingerprints: dict[str, str] = field(default_factory=dict)  # model source -> weights' fingerprint

    def tasks(self) -> list[AttackTask]:
        """Every task, shard-major (early shards finish for every partition first). A task's
        ``config_hash`` is its partition's identity (:func:`partition_hashes`)."""
        out = []
        for shard_id, positions in enumerate(self.shards):
            recs = tuple(self.records[p] for p in positions)
            for d, t, a in self.partitions:
                identity = self.partition_hashes.get(partition_key(d, t, a), self.config_hash)
                out.append(AttackTask(self.run, self.run_id, identity, d, t, a, shard_id, recs))
        return out


def partition_key(defense: str, threat: str, attack: str) -> str:
    """A partition's key in run.json: ``<d>/<t>/<a>`` (the path pieces of its files)."""
    return f"{defense}/{threat}/{attack}"


def partition_hashes(cfg: AttackConfig, fingerprints: dict[str, str]) -> dict[str, str]:
    """``{partition key: hash}``: each partition's identity, the hash of what its rows depend on
    (:meth:`AttackConfig.partition_fields`, model sources replaced by their fingerprints)."""
    return {partition_key(*p): fields_hash(with_fingerprints(cfg.partition_fields(*p), fingerprints))
            for p in cfg.partitions()}


def _load_models(cfg: AttackConfig, expected: dict[str, str] | None = None) -> LoadedModels:
    """The classifier and (for purifying defenses) the diffusion model, loaded on the driver's CPU
    as the workers will: a wrong source or weights replaced since the plan fail here, before
    anything is written (tasks/common/models.py)."""
    models = LoadedModels(torch.device("cpu"), cfg.allow_pickle, expected)
    try:
        models.classifier(cfg.classifier)
        if any(d.kind == "purify" for d in cfg.defenses):
            models.diffusion(cfg.diffusion.source)
    except ModelChangedError as exc:
        raise PlanError(str(exc)) from None
    except ModelLoadError as exc:
        raise PlanError(f"{exc} (checked before anything runs)") from None
    return models


def defense_t_star(defense: DefenseConfig, schedule, t_star_rule: str) -> int:
    """t* of a purifying defense: from its sigma (``schedule.t_star``), or its t_fraction: round(fraction x T)
    (``t_fraction_of: steps``) or the timestep with the VP-SDE's abar at that time (``vp_sde``);
    a fraction's t* is kept in 1..T-1."""
    from densepure_core.diffusion.noise_level import t_star_at_alpha_bar, vp_sde_alpha_bar

    if defense.sigma is not None:
        return int(schedule.t_star(defense.sigma, t_star_rule))
    steps = len(schedule.alphas_cumprod)
    if defense.t_fraction_of == "vp_sde":
        t = t_star_at_alpha_bar(schedule.alphas_cumprod, vp_sde_alpha_bar(defense.t_fraction), t_star_rule)
    else:
        t = round(defense.t_fraction * steps)
    return int(min(steps - 1, max(1, t)))


def check_defenses(cfg: AttackConfig, models: LoadedModels) -> dict[str, int]:
    """{defense: t*} for the purifying defenses (empty without one), after checking that each DDPM
    defense's steps fit in its chain (S <= t*)."""
    if not any(d.kind == "purify" for d in cfg.defenses):
        return {}
    schedule = models.diffusion(cfg.diffusion.source)[1]
    out = {}
    for i, d in enumerate(cfg.defenses):
        if d.kind != "purify":
            continue
        try:
            t = out[d.label] = defense_t_star(d, schedule, cfg.t_star_rule)
        except ValueError as exc:
            raise PlanError(f"defenses.{i}.{'sigma' if d.sigma is not None else 't_fraction'}: {exc}") from exc
        if d.reverse == "ddpm" and d.steps is not None and d.steps > t:
            raise PlanError(f"defenses.{i}.steps = {d.steps} exceeds t* = {t} of defense {d.label!r}: a DDPM "
                            f"purification runs at most t* re-spaced steps; set steps <= {t} (or null for the "
                            f"full chain of {t + 1} calls)")
    return out


def load_attack_plan(out: RunDir | str) -> AttackPlan | None:
    """The attack plan stored in OUT, or None if OUT holds no complete plan."""
    run = RunDir.of(out)
    if not (run.exists(run.run_uri) and run.exists(run.manifest_uri)):
        return None
    meta = run.read_run()
    cols = pq.read_table(pa.BufferReader(run.read_bytes(run.manifest_uri))).to_pydict()
    records = [ImageRecord(i, u, int(lab)) for i, u, lab in zip(cols["image_id"], cols["uri"], cols["label"])]
    partitions = [tuple(p) for p in meta["partitions"]]
    # run.json before partition hashes: every partition's rows carry the run's config_hash
    hashes = meta.get("partition_hashes") or {partition_key(*p): meta["config_hash"] for p in partitions}
    return AttackPlan(run, meta["run_id"], meta["config_hash"], records, meta["shards"], partitions, resumed=True,
                      partition_hashes=hashes, fingerprints=meta.get("model_fingerprints") or {})


def _check_same_job(run: RunDir) -> None:
    if run.job() != "attack":
        raise PlanError(f"{run} holds a certification run (its config.yaml has no 'job: attack'); an attack "
                        f"evaluation needs its own OUT: choose another --out")


def _attacked_partitions(run: RunDir) -> set[str]:
    keys = set()
    for uri in run.attack_files() + run.attack_error_files():
        parts = dict(p.split("=", 1) for p in uri.replace("\\", "/").split("/")[-4:-1] if "=" in p)
        if {"defense", "threat", "attack"} <= set(parts):
            keys.add(partition_key(parts["defense"], parts["threat"], parts["attack"]))
    return keys


def _resume(cfg: AttackConfig, run: RunDir, meta: dict) -> AttackPlan:
    """Resume (or extend) an attack run with rows: every partition with rows keeps its identity."""
    stored = AttackConfig.model_validate(run.read_config())
    if "partition_hashes" not in meta:  # planned before partition hashes: the whole config must match
        if stored.config_hash() != cfg.config_hash():
            diff = differing_fields(stored, cfg)
            raise PlanError(f"{run} already holds an attack run with a different config (fields that differ: "
                            f"{', '.join(diff)}; stored config_hash {stored.config_hash()}, this one "
                            f"{cfg.config_hash()}). Results of different configs are never mixed: choose another "
                            f"--out, or rerun with the stored config ({run.config_uri}) to resume it.")
        return load_attack_plan(run)
    planned_fps = meta.get("model_fingerprints") or {}
    done = _attacked_partitions(run)
    # the models the attacked partitions ran: the classifier, and the diffusion model if one purified
    kinds = {d.label: d.kind for d in stored.defenses}
    purified = any(kinds.get(k.split("/")[0]) == "purify" for k in done)
    used = {stored.classifier.source} | ({stored.diffusion.source} if purified else set())
    models = _load_models(cfg, expected={s: fp for s, fp in planned_fps.items() if s in used})
    fingerprints = {**planned_fps, **models.fingerprints}
    new_hashes = partition_hashes(cfg, fingerprints)
    old_hashes = meta["partition_hashes"]
    changed = sorted(k for k in done if k in new_hashes and new_hashes[k] != old_hashes.get(k))
    if changed:
        known = {partition_key(*p) for p in stored.partitions()}
        diff: set[str] = set()
        for key in changed:
            a = (flat_fields(with_fingerprints(stored.partition_fields(*key.split("/")), planned_fps))
                 if key in known else {})
            b = flat_fields(with_fingerprints(cfg.partition_fields(*key.split("/")), fingerprints))
            diff |= {f for f in set(a) | set(b) if a.get(f) != b.get(f)}
        raise changed_partitions_error(run, changed, diff, "attack rows", "defenses, threats or attacks")
    plan = load_attack_plan(run)
    if stored.config_hash() == cfg.config_hash():
        return plan
    partitions = cfg.partitions()
    added = [partition_key(*p) for p in partitions if partition_key(*p) not in old_hashes]
    plan.partitions, plan.partition_hashes, plan.fingerprints = partitions, new_hashes, fingerprints
    plan.config_hash = cfg.config_hash()
    run.write_text(run.config_uri, cfg.model_copy(update={"out": run.root}).to_yaml())
    meta.update({"config_hash": plan.config_hash, "partitions": [list(p) for p in partitions],
                 "partition_hashes": new_hashes, "model_fingerprints": fingerprints,
                 "t_star": {**meta.get("t_star", {}), **check_defenses(cfg, models)}})
    meta.setdefault("extended", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                            "added": added, "config_hash": plan.config_hash})
    run.write_run(meta)
    log.warning("%s: continuing run %s with this config (%d partition(s) added: %s; attacked partitions kept)",
                run, plan.run_id, len(added), ", ".join(added) or "none")
    return plan


def plan_attack(cfg: AttackConfig, out: RunDir | str | None = None) -> AttackPlan:
    """Make (or reload, or extend) the plan of ``cfg`` in ``out`` (default ``cfg.out``)."""
    run = RunDir.of(out or cfg.out)
    if run.exists(run.config_uri):
        _check_same_job(run)
        meta = run.read_run()
        if meta is not None and (run.attack_files() or run.attack_error_files()):
            return _resume(cfg, run, meta)
        # Only a plan: a failed start stopped before its first shard. The corrected config is
        # planned afresh instead of being refused as "a different config".
        log.warning("%s holds a plan but no attack rows yet: planning again from this config and dataset", run)
    models = _load_models(cfg)
    t_stars = check_defenses(cfg, models)
    records, _ = enumerate_records(cfg.dataset)
    chosen = select_records(records, cfg.dataset)
    check_files_exist(chosen, cfg.on_bad_input)
    unknown = [r for r in chosen if r.label < 0]
    if unknown:
        raise PlanError(f"image {unknown[0].image_id!r} ({unknown[0].uri}) has no label (-1), and "
                        f"{len(unknown)} image(s) in all: an attack maximises the loss of the true label. "
                        f"Label them, or choose images with labels (dataset.start/every/max_images).")
    width = int(models.classifier(cfg.classifier).num_classes)
    check_labels(chosen, width, f"classifier.num_classes: {width}" if cfg.classifier.num_classes
                 else f"the output width of {cfg.classifier.source}", PlanError)
    shards = shard_positions(len(chosen), cfg.shard_size)
    partitions = cfg.partitions()
    fingerprints = models.fingerprints
    hashes = partition_hashes(cfg, fingerprints)
    run_id = f"{cfg.run_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    plan = AttackPlan(run, run_id, cfg.config_hash(), chosen, shards, partitions, partition_hashes=hashes,
                      fingerprints=fingerprints)
    run.write_text(run.config_uri, cfg.model_copy(update={"out": run.root}).to_yaml())
    fault_point("plan:after-config")
    write_manifest(run, chosen, cfg.shard_size)
    sources = {cfg.classifier.source} | ({cfg.diffusion.source} if cfg.diffusion else set())
    meta = {
        "job": "attack", "run_id": run_id, "config_hash": plan.config_hash, "stream_version": STREAM_VERSION,
        "images": len(chosen), "shards": shards, "partitions": [list(p) for p in partitions], "t_star": t_stars,
        "partition_hashes": hashes, "model_fingerprints": fingerprints,
        "model_hashes": source_hashes(sources), "host": socket.gethostname(),
        "created_at": datetime.now(timezone.utc).isoformat(), "versions": library_versions(),
    }
    run.write_run(meta)
    return plan
