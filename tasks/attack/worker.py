"""Stage 2 of ``densepure attack``: workers that hold the models and attack shard after shard.

:class:`AttackWorker` is a plain class (in-process in tests and benchmarks); the pipeline runs
it as Ray actors (:func:`run_attack_stage`, through :func:`tasks.common.raypool.run_on_actors`, as the
vote stage). A worker loads the classifier and the diffusion model once and builds each defense
once. For one task (a shard of images, one defense, threat model and attack) it:

1. loads the images (a bad one fails the run or is quarantined, ``on_bad_input``);
2. scores the clean images over M purifications (``densepure_core.attack.predict``);
3. attacks them (``densepure_core.attack.run_attack``) and scores the final examples over the
   same M purifications (common random numbers: clean and adversarial predictions are paired),
   or, for ``dwbox``, both under the attack's own fixed noise; with ``any_iterate``, also checks
   the clean image and every iterate against M' fresh purifications (DiffBreak's protocol,
   ``densepure_core.attack.IterateCheck``);
4. writes one row per image (``tasks.common.layout.ATTACKS_SCHEMA``) whole and atomically.

A shard whose file already holds exactly its images for this config is skipped, so a rerun
after a crash, or Ray's retry of a killed actor, never duplicates or loses a row.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import torch

from densepure_core.attack import (AttackSpec, Defense, IterateCheck, ThreatModel, eot_samples, perturbation_norms,
                                   predict, run_attack, score)
from densepure_core.config.attack import AttackConfig
from densepure_core.data.sources import DatasetError, load_image
from tasks.attack.plan import AttackPlan, AttackTask, defense_t_star
from tasks.common.faults import fault_point
from tasks.common.layout import ATTACKS_SCHEMA
from tasks.common.models import LoadedModels
from tasks.common.quarantine import publish_shard_errors
from tasks.common.raypool import run_on_actors
from tasks.common.shards import remove_stale_temporaries, shard_state
from tasks.common.worker_label import worker_label
from tasks.common.workers import (
    BadInputError,
    check_image_fits,
    resolve_device,
    stopped_by_bad_input,
)

__all__ = ["AttackWorker", "AttackShardResult", "run_attack_stage"]

log = logging.getLogger("densepure.attack")


@dataclass
class AttackShardResult:
    defense: str
    threat: str
    attack: str
    shard: int
    images: int
    skipped: bool
    seconds: float
    worker: str = ""
    quarantined: int = 0
    recomputed_reason: str = ""


class AttackWorker:
    """Holds the models of one attack run and attacks shards (see the module docstring).

    Args:
        config: the run's AttackConfig (or its dict form, as Ray ships it).
        worker_name: recorded in every row.
        threads: torch intra-op threads (default: torch's).
    """

    def __init__(self, config: AttackConfig | dict, worker_name: str | None = None, threads: int | None = None,
                 fingerprints: dict[str, str] | None = None):
        self.cfg = config if isinstance(config, AttackConfig) else AttackConfig.model_validate(config)
        self.worker = worker_label(worker_name)  # actor@host/node on Ray, host:pid in-process
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(self.cfg.device)
        # Loaded once; a model whose weights are not the planned ones is refused by name.
        self.models = LoadedModels(self.device, self.cfg.allow_pickle, expected=fingerprints)
        self._defenses: dict[str, Defense] = {}

    # -- models, loaded once ----------------------------------------------------------------
    def classifier(self):
        # gradients w.r.t. the input only
        return self.models.classifier(self.cfg.classifier).eval().requires_grad_(False)

    def _load_diffusion(self):
        dm, schedule = self.models.diffusion(self.cfg.diffusion.source)
        dm.unet.eval().requires_grad_(False)
        return dm, schedule

    def fingerprints(self, defense: Defense) -> tuple[str, str | None]:
        """(classifier, diffusion model or None) fingerprints of what ``defense`` runs."""
        fps = self.models.fingerprints
        return fps[self.cfg.classifier.source], fps[self.cfg.diffusion.source] if defense.purifies else None

    def defense(self, label: str) -> Defense:
        """The defense named ``label``, built once per worker."""
        if label in self._defenses:
            return self._defenses[label]
        from densepure_core.diffusion.respace import respaced_timesteps
        from densepure_core.diffusion.reverse import ReverseProcess, unet_denoiser

        d = self.cfg.defense(label)
        if d.kind == "none":
            defense = Defense(label, self.classifier())
        else:
            dm, schedule = self._load_diffusion()
            t_star = defense_t_star(d, schedule, self.cfg.t_star_rule)
            if d.reverse == "one_shot":
                timesteps = (t_star,)
            elif d.steps is None:
                timesteps = tuple(range(t_star, -1, -1))
            else:
                timesteps = tuple(respaced_timesteps(t_star, d.steps))
            process = ReverseProcess(unet_denoiser(dm.unet), schedule, timesteps)
            defense = Defense(label, self.classifier(), process, t_star, d.k)
        self._defenses[label] = defense
        return defense

    # -- work -------------------------------------------------------------------------------
    def _load(self, task: AttackTask, defense: Defense):
        """(records, images) that loaded, and error rows for those that did not."""
        good, images, errors = [], [], []
        for rec in task.records:
            try:
                x = load_image(rec, self.cfg.dataset)
                if defense.purifies:
                    self._check_image(x, rec)
            except DatasetError as exc:
                if self.cfg.on_bad_input == "fail":
                    raise stopped_by_bad_input(exc) from None
                log.warning("quarantined %s: %s", rec.image_id, exc)
                errors.append({
                    "run_id": task.run_id, "config_hash": task.config_hash, "image_id": rec.image_id,
                    "uri": rec.uri, "label": rec.label, "sigma": math.nan,
                    "method": f"{task.defense}/{task.threat}/{task.attack}", "shard": task.shard,
                    "error_type": type(exc).__name__, "error": str(exc), "worker": self.worker,
                    "created_at": datetime.now(timezone.utc)})
                continue
            good.append(rec)
            images.append(x)
        return good, images, errors

    def _check_image(self, x: torch.Tensor, rec) -> None:
        check_image_fits(x, rec, self._load_diffusion()[0].unet)

    def run_shard(self, task: AttackTask) -> AttackShardResult:
        """Attack one shard and publish its rows; skip it if a valid file exists."""
        start = time.perf_counter()
        complete, reason, quarantined = shard_state(task)
        if complete:
            return AttackShardResult(task.defense, task.threat, task.attack, task.shard, len(task.records), True,
                                     0.0, self.worker, quarantined)
        if reason:
            log.warning("shard %s: existing file %s; recomputing", task.uri, reason)
        defense = self.defense(task.defense)
        threat_cfg, attack_cfg = self.cfg.threat(task.threat), self.cfg.attack(task.attack)
        threat = ThreatModel(threat_cfg.norm, threat_cfg.eps)
        spec = AttackSpec(attack_cfg.kind, iterations=attack_cfg.iterations, eot=attack_cfg.eot_samples,
                          step_size=attack_cfg.step_size, random_start=attack_cfg.random_start,
                          gradient=attack_cfg.gradient)
        records, images, errors = self._load(task, defense)
        rows = []
        if records:
            rows = self._attack(task, defense, threat, spec, records, images)
        fault_point("attack:mid-shard")  # attacked in memory, nothing of the shard written
        publish_shard_errors(task.run, task.errors_uri, errors)
        task.run.write_parquet(task.uri, pa.Table.from_pylist(rows, schema=ATTACKS_SCHEMA))
        return AttackShardResult(task.defense, task.threat, task.attack, task.shard, len(rows), False,
                                 time.perf_counter() - start, self.worker, len(errors), reason)

    def _attack(self, task: AttackTask, defense: Defense, threat: ThreatModel, spec: AttackSpec,
                records, images) -> list[dict]:
        seed, rows_cap = self.cfg.seed, self.cfg.batch_size
        x = torch.stack(images).to(self.device)
        y = torch.tensor([r.label for r in records], dtype=torch.long, device=self.device)
        ids = [r.image_id for r in records]
        width = defense.num_classes
        bad = [r for r in records if not 0 <= r.label < width]
        if bad:
            raise BadInputError(f"image {bad[0].image_id!r} has label {bad[0].label}, but the classifier has {width} "
                                f"outputs: fix the labels, or use the classifier trained for them")
        # dwbox: clean and adversarial examples are scored under the attack's own fixed noise.
        fixed = spec.kind == "dwbox" and defense.purifies
        purpose, m = ("fixed", 1) if fixed else ("score", self.cfg.score_purifications)
        t0 = time.perf_counter()
        clean = predict(defense, x, ids, run_seed=seed, purpose=purpose, purifications=m, max_rows=rows_cap)
        check = None
        if self.cfg.any_iterate:
            check = IterateCheck(defense, y.cpu().numpy(), ids, run_seed=seed,
                                 purifications=self.cfg.iterate_purifications, fixed=fixed, max_rows=rows_cap)
            check(0, x)  # the clean image, as DiffBreak's initial check
        x_adv, stats = run_attack(defense, x, y, ids, threat, spec, run_seed=seed, max_rows=rows_cap, on_iterate=check)
        adv = predict(defense, x_adv, ids, run_seed=seed, purpose=purpose, purifications=m, max_rows=rows_cap)
        seconds = (time.perf_counter() - t0) / len(ids)
        labels = y.cpu().numpy()
        s_clean, s_adv = score(clean, labels, width), score(adv, labels, width)
        linf, l2 = (v.cpu().numpy() for v in perturbation_norms(x_adv, x))
        m_scored = clean.shape[1]
        unet = stats.unet_calls + 2 * m_scored * defense.votes * defense.unet_calls
        clf_fp, diff_fp = self.fingerprints(defense)
        checks = check.checks if check is not None else [0] * len(ids)  # per image: they stop once it is broken
        now = datetime.now(timezone.utc)
        rows = []
        for i, rec in enumerate(records):
            rows.append({
                "run_id": task.run_id, "config_hash": task.config_hash, "image_id": rec.image_id,
                "label": rec.label, "defense": task.defense, "threat": task.threat, "norm": threat.norm,
                "eps": threat.eps, "attack": task.attack, "attack_kind": spec.kind,
                "t_star": -1 if defense.t_star is None else defense.t_star, "steps": defense.unet_calls,
                "k": defense.votes, "iterations": stats.iterations, "eot": eot_samples(defense, spec),
                "step_size": spec.step_size if spec.step_size is not None else threat.default_step_size(),
                "random_start": spec.random_start, "gradient_calls": stats.gradient_calls,
                "unet_calls": unet + int(checks[i]) * defense.votes * defense.unet_calls,
                "seconds": seconds, "linf": float(linf[i]), "l2": float(l2[i]), "score_purifications": m_scored,
                "clean_predictions": clean[i].tolist(), "adv_predictions": adv[i].tolist(),
                "clean_mean": float(s_clean.mean[i]), "clean_majority": bool(s_clean.majority[i]),
                "clean_worst": bool(s_clean.worst[i]), "adv_mean": float(s_adv.mean[i]),
                "adv_majority": bool(s_adv.majority[i]), "adv_worst": bool(s_adv.worst[i]),
                "iterate_purifications": check.purifications if check else None,
                "broken_at_majority": int(check.broken_at_majority[i]) if check else None,
                "broken_at_worst": int(check.broken_at_worst[i]) if check else None,
                "worker": self.worker, "seed": seed, "created_at": now,
                "classifier_fingerprint": clf_fp, "diffusion_fingerprint": diff_fp,
            })
        return rows


def run_attack_stage(cfg: AttackConfig, plan: AttackPlan, *, ray_address: str | None = None,
                     on_result: Callable[[AttackShardResult], None] | None = None) -> list[AttackShardResult]:
    """Attack every missing shard of ``plan`` on Ray actors; one result per task (skipped ones too)."""
    removed = remove_stale_temporaries(plan.run)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted write under %s", removed, plan.run)
    results, todo = [], []
    for t in plan.tasks():
        complete, _, quarantined = shard_state(t)
        if complete:
            res = AttackShardResult(t.defense, t.threat, t.attack, t.shard, len(t.records), True, 0.0,
                                    quarantined=quarantined)
            results.append(res)
            if on_result:
                on_result(res)
        else:
            todo.append(t)
    config = cfg.model_dump(mode="json")
    results += run_on_actors(AttackWorker, lambda name, threads: (config, name, threads, plan.fingerprints), todo,
                             "run_shard",
                             workers=cfg.workers, ray_address=ray_address, on_result=on_result)
    return results
