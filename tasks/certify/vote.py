"""Stage 2, vote: workers that hold the models and turn shards into Parquet vote files.

:class:`VoteWorker` is a plain class (usable in-process, in tests and benchmarks); the pipeline
runs it as a Ray actor (:func:`run_vote_stage`): one actor per GPU where there are GPUs, else
``workers`` actors with fractional CPUs (on 2 cores, whole-CPU actors starve Ray's own tasks).
Each actor loads the diffusion model once and each classifier once (noise-trained classifiers
per sigma are cached by source), then certifies shard after shard.

Writes are idempotent: a shard's file is written whole and atomically under its final name,
and a shard whose file already validates (row count, config hash, image ids) is skipped, so
Ray's task retries and a rerun after a crash never duplicate or lose an image.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import torch

from densepure_core.certification.sequential import FIXED_BOUND
from densepure_core.config import CertifyConfig, MethodConfig
from densepure_core.data.sources import DatasetError, load_image
from densepure_core.smoothing import (
    AdaptivePlan,
    EngineOptions,
    SmoothedBaseClassifier,
    prefetch,
)
from tasks.certify.models import RunModels
from tasks.certify.plan import Plan, ShardTask
from tasks.common.faults import fault_point
from tasks.common.layout import VOTES_SCHEMA
from tasks.common.planning import check_labels
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

__all__ = ["VoteWorker", "ShardResult", "shard_is_complete", "remove_stale_temporaries", "run_vote_stage",
           "PURIFIER_KIND"]

log = logging.getLogger("densepure.vote")

# method kind -> purifier kind (densepure_core.diffusion.purify.make_purifier)
PURIFIER_KIND = {"rs": "none", "dds": "one_shot", "densepure": "densepure"}


@dataclass
class ShardResult:
    sigma: float
    method: str
    shard: int
    images: int
    skipped: bool  # already complete: not recomputed
    seconds: float
    unet_calls: int = 0
    classifier_calls: int = 0
    worker: str = ""
    recomputed_reason: str = ""  # why an existing file was not accepted
    quarantined: int = 0  # images recorded in the errors table (on_bad_input=quarantine)


def shard_is_complete(task: ShardTask) -> tuple[bool, str]:
    """Whether ``task.uri`` holds exactly this shard's votes for this config.

    Returns (complete, reason). A missing file is (False, ""); a truncated/unreadable file, a
    file of another config or with other images is (False, reason): it will be recomputed.
    """
    complete, reason, _ = shard_state(task)
    return complete, reason


def _drop_stale_errors(task: ShardTask) -> None:
    """A complete shard whose votes hold every image has no quarantined image: delete an errors
    file an earlier computation left (OUTs written before recomputations replaced it)."""
    if task.run.remove(task.errors_uri):
        log.warning("shard %s: removed the errors file of an earlier computation (%s); its images "
                    "are all voted now", task.uri, task.errors_uri)


class VoteWorker:
    """Holds the models of one run and certifies shards (see the module docstring).

    Args:
        config: the run's CertifyConfig (or its dict form, as Ray ships it).
        num_classes: length of the count vectors (the plan's ``classifier.num_classes``); None:
            the output width of the first classifier loaded (every later one must match).
        worker_name: recorded in every row (``worker`` column).
        threads: torch intra-op threads (default: all cores / workers).
    """

    def __init__(self, config: CertifyConfig | dict, num_classes: int | None = None,
                 worker_name: str | None = None, threads: int | None = None,
                 fingerprints: dict[str, str] | None = None):
        self.cfg = config if isinstance(config, CertifyConfig) else CertifyConfig.model_validate(config)
        self.worker = worker_label(worker_name)  # actor@host/node on Ray, host:pid in-process
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(self.cfg.device)
        # Loaded once; a model whose weights are not the planned ones is refused by name.
        self.models = RunModels(self.cfg, self.device, num_classes, expected=fingerprints)
        # One per partition: compiled modules, captured CUDA graphs and slot buffers are reused.
        self._smoothed: dict[tuple[str, float], SmoothedBaseClassifier] = {}

    @property
    def num_classes(self) -> int | None:
        return self.models.num_classes

    def classifier(self, method: MethodConfig, sigma: float):
        return self.models.partition_classifier(method, sigma)

    def check_labels(self, task: ShardTask, method: MethodConfig) -> int:
        """The classifier's width for ``task``, after checking the shard's labels against it.

        Raises:
            BadInputError: a label is neither -1 nor below the width (names the image and the fix);
                never quarantined: the dataset and the classifier disagree for the whole run.
        """
        width = int(self.classifier(method, task.sigma).num_classes)
        check_labels(task.records, width, f"the output width of {self.cfg.classifier_for(method, task.sigma).source}",
                     BadInputError)
        return width

    def smoothed(self, method: MethodConfig, sigma: float) -> SmoothedBaseClassifier:
        """The smoothed base classifier of one (sigma, method) partition, built once per worker."""
        from densepure_core.diffusion.purify import make_purifier, unet_denoiser

        key = (method.label, float(sigma))
        if key in self._smoothed:
            return self._smoothed[key]
        kind = PURIFIER_KIND[method.kind]
        if kind == "none":
            purifier = make_purifier("none", None, None, sigma)
        else:
            diffusion, schedule = self.models.run_diffusion()
            purifier = make_purifier(kind, unet_denoiser(diffusion.unet), schedule, sigma, steps=method.steps,
                                     t_star_rule=self.cfg.t_star_rule)
        options = EngineOptions.from_settings(self.cfg, device=self.device,
                                              model_name=f"{method.label} at sigma={sigma}")
        sbc = self._smoothed[key] = SmoothedBaseClassifier(
            self.classifier(method, sigma), purifier, sigma, votes=method.k, num_classes=self.num_classes,
            run_seed=self.cfg.seed, options=options)
        return sbc

    def method(self, label: str) -> MethodConfig:
        for m in self.cfg.methods:
            if m.label == label:
                return m
        raise KeyError(f"method {label!r} is not in the config (have {[m.label for m in self.cfg.methods]})")

    # -- work -----------------------------------------------------------------------------
    def run_shard(self, task: ShardTask) -> ShardResult:
        """Certify one shard and publish its vote file; skip it if a valid file exists."""
        start = time.perf_counter()
        complete, reason, quarantined = shard_state(task)
        if complete:
            if not quarantined:
                _drop_stale_errors(task)
            return ShardResult(task.sigma, task.method, task.shard, len(task.records), True, 0.0, worker=self.worker)
        if reason:
            log.warning("shard %s: existing file %s; recomputing", task.uri, reason)
        method = self.method(task.method)
        self.check_labels(task, method)  # also fixes the class count before the engine is built
        sbc = self.smoothed(method, task.sigma)
        models = self.models.partition(method, task.sigma)
        t_star = getattr(sbc.purifier, "t_star", None)
        rows, errors = [], []
        unet = clf = 0

        def load(rec):  # runs in the prefetch thread; a bad image travels as its exception
            try:
                x = load_image(rec, self.cfg.dataset)
                self._check_image(x, rec, method)
                return rec.image_id, x
            except DatasetError as exc:
                return rec.image_id, exc

        # Images stream through one engine: the next image's copies fill the slots the current
        # one frees, and the next images load in a background thread while the device works.
        images = prefetch((load(rec) for rec in task.records), depth=self.cfg.prefetch)
        adaptive = AdaptivePlan.from_config(self.cfg, task.sigma) if self.cfg.sampling == "adaptive" else None
        bound = adaptive.bound if adaptive else FIXED_BOUND
        bound_params = json.dumps(adaptive.params if adaptive else {}, sort_keys=True)
        results = sbc.certify_many(images, self.cfg.n0, self.cfg.n, errors="return", adaptive=adaptive)
        for rec, res in zip(task.records, results):
            exc = res.error
            if exc is not None:
                if self.cfg.on_bad_input == "fail":
                    raise stopped_by_bad_input(exc)
                log.warning("quarantined %s: %s", rec.image_id, exc)
                errors.append({
                    "run_id": task.run_id, "config_hash": task.config_hash, "image_id": rec.image_id,
                    "uri": rec.uri, "label": rec.label, "sigma": float(task.sigma), "method": task.method,
                    "shard": task.shard, "error_type": type(exc).__name__, "error": str(exc),
                    "worker": self.worker, "created_at": datetime.now(timezone.utc)})
                continue
            rows.append({
                "run_id": task.run_id, "config_hash": task.config_hash, "image_id": rec.image_id,
                "label": rec.label, "sigma": float(task.sigma), "method": task.method,
                "t_star": -1 if t_star is None else int(t_star), "k": method.k, "steps": method.steps,
                "n0": self.cfg.n0, "n": res.n_used, "counts0": res.counts0.tolist(), "counts": res.counts.tolist(),
                "unet_calls": res.stats.unet_calls, "classifier_calls": res.stats.classifier_calls,
                "seconds": res.stats.seconds, "worker": self.worker, "seed": self.cfg.seed,
                "created_at": datetime.now(timezone.utc),
                "sampling": self.cfg.sampling, "n_used": res.n_used, "n_max": self.cfg.budget,
                "bound": bound, "bound_params": bound_params,
                "classifier_fingerprint": models.classifier_fingerprint,
                "diffusion_fingerprint": models.diffusion_fingerprint,
            })
            unet += res.stats.unet_calls
            clf += res.stats.classifier_calls
            fault_point("vote:mid-shard")  # certified in memory, not yet written
        # The errors file first: the votes file marks the shard complete (shard_is_complete). A
        # recomputation replaces (or, with no bad image now, deletes) an earlier computation's
        # errors file, so a fixed image is neither reported nor subtracted from the expected count.
        publish_shard_errors(task.run, task.errors_uri, errors)
        task.run.write_parquet(task.uri, pa.Table.from_pylist(rows, schema=VOTES_SCHEMA))
        return ShardResult(task.sigma, task.method, task.shard, len(rows), False, time.perf_counter() - start,
                           unet, clf, self.worker, reason, quarantined=len(errors))

    def _check_image(self, x: torch.Tensor, rec, method: MethodConfig) -> None:
        """Refuse an image the diffusion model cannot take (wrong size or channels)."""
        if method.kind != "rs":  # RS: the classifier resizes on its device
            check_image_fits(x, rec, self.models.run_diffusion()[0].unet)


def run_vote_stage(cfg: CertifyConfig, plan: Plan, *, ray_address: str | None = None,
                   on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Vote every missing shard of ``plan`` on a pool of Ray actors; returns one result per task.

    Local runs start Ray on loopback and shut it down afterwards; ``ray_address`` joins an
    existing cluster instead. A killed actor is restarted and its task retried by Ray
    (:func:`tasks.common.raypool.run_on_actors`).
    """
    removed = remove_stale_temporaries(plan.run)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted write under %s", removed, plan.run)
    tasks = plan.tasks()
    results: list[ShardResult] = []
    todo = []
    any_errors = bool(plan.run.error_files())  # one listing; no per-shard check without errors
    for t in tasks:  # complete shards are skipped without starting any worker
        complete, _, quarantined = shard_state(t)
        if complete and any_errors and not quarantined:
            _drop_stale_errors(t)
        if complete:
            res = ShardResult(t.sigma, t.method, t.shard, len(t.records), True, 0.0)
            results.append(res)
            if on_result:
                on_result(res)
        else:
            todo.append(t)
    if not todo:
        return results

    config = cfg.model_dump(mode="json")
    results += run_on_actors(VoteWorker, lambda name, threads: (config, plan.num_classes, name, threads,
                                                                plan.fingerprints),
                             todo, "run_shard", workers=cfg.workers, ray_address=ray_address, on_result=on_result)
    return results
