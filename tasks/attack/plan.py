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

import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from densepure_core.config.attack import AttackConfig, DefenseConfig
from densepure_core.data.sources import ImageRecord, enumerate_records, select_records
from densepure_core.rng import STREAM_VERSION
from tasks.common.faults import fault_point
from tasks.common.planning import (
    PlanError,
    check_files_exist,
    check_labels,
    differing_fields,
    library_versions,
    local_model_dir,
    shard_positions,
    source_hashes,
    write_manifest,
)
from tasks.common.run_dir import RunDir

__all__ = ["AttackTask", "AttackPlan", "plan_attack", "load_attack_plan", "defense_t_star", "check_defenses"]


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

    def tasks(self) -> list[AttackTask]:
        """Every task, shard-major (early shards finish for every partition first)."""
        out = []
        for shard_id, positions in enumerate(self.shards):
            recs = tuple(self.records[p] for p in positions)
            for d, t, a in self.partitions:
                out.append(AttackTask(self.run, self.run_id, self.config_hash, d, t, a, shard_id, recs))
        return out


def defense_t_star(defense: DefenseConfig, schedule, t_star_rule: str) -> int:
    """t* of a purifying defense: from its sigma (``schedule.t_star``) or round(fraction x T),
    at most T - 1."""
    if defense.sigma is not None:
        return int(schedule.t_star(defense.sigma, t_star_rule))
    steps = len(schedule.alphas_cumprod)
    return int(min(steps - 1, max(1, round(defense.t_fraction * steps))))


def check_defenses(cfg: AttackConfig) -> dict[str, int]:
    """{defense: t*} for the purifying defenses of a local diffusion model (empty otherwise),
    after checking that each DDPM defense's steps fit in its chain (S <= t*)."""
    if cfg.diffusion is None or not any(d.kind == "purify" for d in cfg.defenses):
        return {}
    root = local_model_dir(cfg.diffusion.source)
    if root is None:
        return {}
    import os

    from diffusers import DDPMScheduler

    from densepure_core.diffusion.schedule import DiffusionSchedule

    sub = "scheduler" if os.path.isdir(os.path.join(root, "scheduler")) else None
    try:
        schedule = DiffusionSchedule.from_scheduler(DDPMScheduler.from_pretrained(root, subfolder=sub))
    except (OSError, ValueError) as exc:
        raise PlanError(f"diffusion.source {cfg.diffusion.source!r}: no readable scheduler config in {root} "
                        f"({exc}); expected scheduler/scheduler_config.json (diffusers save_pretrained)") from exc
    out = {}
    for i, d in enumerate(cfg.defenses):
        if d.kind != "purify":
            continue
        try:
            t = out[d.label] = defense_t_star(d, schedule, cfg.t_star_rule)
        except ValueError as exc:
            raise PlanError(f"defenses.{i}.sigma: {exc}") from exc
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
    return AttackPlan(run, meta["run_id"], meta["config_hash"], records, meta["shards"],
                      [tuple(p) for p in meta["partitions"]], resumed=True)


def _check_same_run(cfg: AttackConfig, run: RunDir) -> None:
    stored = run.read_config() or {}
    if stored.get("job") != "attack":
        raise PlanError(f"{run} holds a certification run (its config.yaml has no 'job: attack'); an attack "
                        f"evaluation needs its own OUT: choose another --out")
    stored_cfg = AttackConfig.model_validate(stored)
    if stored_cfg.config_hash() == cfg.config_hash():
        return
    diff = differing_fields(stored_cfg, cfg)
    raise PlanError(f"{run} already holds an attack run with a different config (fields that differ: "
                    f"{', '.join(diff)}; stored config_hash {stored_cfg.config_hash()}, this one "
                    f"{cfg.config_hash()}). Results of different configs are never mixed: choose another --out, "
                    f"or rerun with the stored config ({run.config_uri}) to resume it.")


def plan_attack(cfg: AttackConfig, out: RunDir | str | None = None) -> AttackPlan:
    """Make (or reload) the plan of ``cfg`` in ``out`` (default ``cfg.out``)."""
    run = RunDir.of(out or cfg.out)
    if run.exists(run.config_uri):
        _check_same_run(cfg, run)
        existing = load_attack_plan(run)
        if existing is not None:
            return existing
    t_stars = check_defenses(cfg)
    records, _ = enumerate_records(cfg.dataset)
    chosen = select_records(records, cfg.dataset)
    check_files_exist(chosen, cfg.on_bad_input)
    unknown = [r for r in chosen if r.label < 0]
    if unknown:
        raise PlanError(f"image {unknown[0].image_id!r} ({unknown[0].uri}) has no label (-1), and "
                        f"{len(unknown)} image(s) in all: an attack maximises the loss of the true label. "
                        f"Label them, or choose images with labels (dataset.start/every/max_images).")
    if cfg.classifier.num_classes:
        check_labels(chosen, cfg.classifier.num_classes, f"classifier.num_classes: {cfg.classifier.num_classes}",
                     PlanError)
    shards = shard_positions(len(chosen), cfg.shard_size)
    partitions = cfg.partitions()
    run_id = f"{cfg.run_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    plan = AttackPlan(run, run_id, cfg.config_hash(), chosen, shards, partitions)
    run.write_text(run.config_uri, cfg.model_copy(update={"out": run.root}).to_yaml())
    fault_point("plan:after-config")
    write_manifest(run, chosen, cfg.shard_size)
    sources = {cfg.classifier.source} | ({cfg.diffusion.source} if cfg.diffusion else set())
    meta = {
        "job": "attack", "run_id": run_id, "config_hash": plan.config_hash, "stream_version": STREAM_VERSION,
        "images": len(chosen), "shards": shards, "partitions": [list(p) for p in partitions], "t_star": t_stars,
        "model_hashes": source_hashes(sources), "host": socket.gethostname(),
        "created_at": datetime.now(timezone.utc).isoformat(), "versions": library_versions(),
    }
    run.write_run(meta)
    return plan
