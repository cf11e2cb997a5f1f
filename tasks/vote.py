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

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from densepure_core.config import CertifyConfig, MethodConfig, resolve_source
from densepure_core.data.sources import load_image
from densepure_core.smoothing import SmoothedBaseClassifier

from . import storage
from .aggregate import VOTES_SCHEMA
from .plan import Plan, ShardTask

__all__ = ["VoteWorker", "ShardResult", "shard_is_complete", "run_vote_stage", "resolve_device",
           "PURIFIER_KIND"]

log = logging.getLogger("densepure.vote")

# method kind -> purifier kind (densepure_core.purify.make_purifier)
PURIFIER_KIND = {"rs": "none", "dds": "one_shot", "densepure": "densepure"}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def shard_is_complete(task: ShardTask) -> tuple[bool, str]:
    """Whether ``task.uri`` holds exactly this shard's votes for this config.

    Returns (complete, reason). A missing file is (False, ""); a truncated/unreadable file, a
    file of another config or with other images is (False, reason): it will be recomputed.
    """
    if not storage.exists(task.uri):
        return False, ""
    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(task.uri)), columns=["config_hash", "image_id"])
    except Exception as exc:  # truncated or corrupt Parquet
        return False, f"unreadable ({type(exc).__name__})"
    hashes = set(table.column("config_hash").to_pylist())
    if hashes != {task.config_hash}:
        return False, f"written by another config ({sorted(hashes)})"
    ids = table.column("image_id").to_pylist()
    if sorted(ids) != sorted(r.image_id for r in task.records) or len(ids) != len(task.records):
        return False, f"holds {len(ids)} rows, expected {len(task.records)} images"
    return True, ""


class VoteWorker:
    """Holds the models of one run and certifies shards (see the module docstring).

    Args:
        config: the run's CertifyConfig (or its dict form, as Ray ships it).
        num_classes: length of the count vectors.
        worker_name: recorded in every row (``worker`` column).
        threads: torch intra-op threads (default: all cores / workers).
    """

    def __init__(self, config: CertifyConfig | dict, num_classes: int, worker_name: str | None = None,
                 threads: int | None = None):
        self.cfg = config if isinstance(config, CertifyConfig) else CertifyConfig.model_validate(config)
        self.num_classes = int(num_classes)
        self.worker = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(self.cfg.device)
        self._diffusion = None
        self._schedule = None
        self._classifiers: dict[str, torch.nn.Module] = {}

    # -- models, loaded once --------------------------------------------------------------
    def _load_diffusion(self):
        if self._diffusion is None:
            from densepure_core.models import load_diffusion
            from densepure_core.schedule import DiffusionSchedule

            self._diffusion = load_diffusion(resolve_source(self.cfg.diffusion.source), device=self.device,
                                             allow_pickle=self.cfg.allow_pickle)
            self._schedule = DiffusionSchedule.from_scheduler(self._diffusion.scheduler)
        return self._diffusion, self._schedule

    def classifier(self, method: MethodConfig, sigma: float):
        from densepure_core.models import load_classifier

        ccfg = self.cfg.classifier_for(method, sigma)
        source = resolve_source(ccfg.source)
        if source not in self._classifiers:
            self._classifiers[source] = load_classifier(
                source, num_classes=ccfg.num_classes or self.num_classes, model_name=ccfg.model_name,
                input_size=ccfg.input_size, interpolation=ccfg.interpolation, mean=ccfg.mean, std=ccfg.std,
                device=self.device, allow_pickle=self.cfg.allow_pickle)
        return self._classifiers[source]

    def smoothed(self, method: MethodConfig, sigma: float) -> SmoothedBaseClassifier:
        """The smoothed base classifier of one (sigma, method) partition."""
        from densepure_core.purify import make_purifier, unet_denoiser

        kind = PURIFIER_KIND[method.kind]
        if kind == "none":
            purifier = make_purifier("none", None, None, sigma)
        else:
            diffusion, schedule = self._load_diffusion()
            purifier = make_purifier(kind, unet_denoiser(diffusion.unet), schedule, sigma, steps=method.steps,
                                     t_star_rule=self.cfg.t_star_rule)
        return SmoothedBaseClassifier(
            self.classifier(method, sigma), purifier, sigma, votes=method.k, num_classes=self.num_classes,
            batch_size=self.cfg.batch_size, early_exit=self.cfg.early_exit, run_seed=self.cfg.seed,
            pad_batches=self.cfg.pad_batches, precision=self.cfg.precision, device=self.device,
            model_name=f"{method.label} at sigma={sigma}")

    def method(self, label: str) -> MethodConfig:
        for m in self.cfg.methods:
            if m.label == label:
                return m
        raise KeyError(f"method {label!r} is not in the config (have {[m.label for m in self.cfg.methods]})")

    # -- work -----------------------------------------------------------------------------
    def run_shard(self, task: ShardTask) -> ShardResult:
        """Certify one shard and publish its vote file; skip it if a valid file exists."""
        start = time.perf_counter()
        complete, reason = shard_is_complete(task)
        if complete:
            return ShardResult(task.sigma, task.method, task.shard, len(task.records), True, 0.0, worker=self.worker)
        if reason:
            log.warning("shard %s: existing file %s; recomputing", task.uri, reason)
        method = self.method(task.method)
        sbc = self.smoothed(method, task.sigma)
        t_star = getattr(sbc.purifier, "t_star", None)
        rows = []
        unet = clf = 0
        for rec in task.records:
            x = load_image(rec, self.cfg.dataset)
            t0 = time.perf_counter()
            counts0, counts, stats = sbc.selection_and_estimation(x, rec.image_id, self.cfg.n0, self.cfg.n)
            rows.append({
                "run_id": task.run_id, "config_hash": task.config_hash, "image_id": rec.image_id,
                "label": rec.label, "sigma": float(task.sigma), "method": task.method,
                "t_star": -1 if t_star is None else int(t_star), "k": method.k, "steps": method.steps,
                "n0": self.cfg.n0, "n": self.cfg.n, "counts0": counts0.tolist(), "counts": counts.tolist(),
                "unet_calls": stats.unet_calls, "classifier_calls": stats.classifier_calls,
                "seconds": time.perf_counter() - t0, "worker": self.worker, "seed": self.cfg.seed,
                "created_at": datetime.now(timezone.utc),
            })
            unet += stats.unet_calls
            clf += stats.classifier_calls
        storage.write_parquet_atomic(task.uri, pa.Table.from_pylist(rows, schema=VOTES_SCHEMA))
        return ShardResult(task.sigma, task.method, task.shard, len(rows), False, time.perf_counter() - start,
                           unet, clf, self.worker, reason)


def _start_local_ray(num_cpus: int | None = None) -> None:
    """Start Ray on loopback only (no dashboard; session files in a private temp dir)."""
    import ray

    # Without this, Ray binds to the machine's non-loopback address (see docs/operations.md).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    temp_dir = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="densepure-ray-")
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir,
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)


def run_vote_stage(cfg: CertifyConfig, plan: Plan, *, ray_address: str | None = None,
                   on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Vote every missing shard of ``plan`` on a pool of Ray actors; returns one result per task.

    Local runs start Ray on loopback and shut it down afterwards; ``ray_address`` joins an
    existing cluster instead. A killed actor is restarted and its task retried by Ray.
    """
    import ray
    from ray.util import ActorPool

    tasks = plan.tasks()
    results: list[ShardResult] = []
    todo = []
    for t in tasks:  # complete shards are skipped without starting any worker
        complete, _ = shard_is_complete(t)
        if complete:
            res = ShardResult(t.sigma, t.method, t.shard, len(t.records), True, 0.0)
            results.append(res)
            if on_result:
                on_result(res)
        else:
            todo.append(t)
    if not todo:
        return results

    started_here = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            _start_local_ray()
        started_here = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_workers = cfg.workers or (gpus if gpus else 1)
        n_workers = max(1, min(n_workers, len(todo)))
        if gpus:
            options = {"num_gpus": 1, "num_cpus": 1}
            threads = None
        else:
            # Fractional CPUs: whole-CPU actors on 2 cores deadlock Ray's own tasks.
            options = {"num_cpus": 0.5}
            threads = max(1, cpus // n_workers)
        actor_cls = ray.remote(max_restarts=3, max_task_retries=3)(VoteWorker)
        config = cfg.model_dump(mode="json")
        actors = [actor_cls.options(**options).remote(config, plan.num_classes, f"actor-{i}", threads)
                  for i in range(n_workers)]
        pool = ActorPool(actors)
        for res in pool.map_unordered(lambda a, t: a.run_shard.remote(t), todo):
            results.append(res)
            if on_result:
                on_result(res)
        for a in actors:
            ray.kill(a)
    finally:
        if started_here:
            ray.shutdown()
    return results
