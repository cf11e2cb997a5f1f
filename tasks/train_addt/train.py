"""``densepure train-addt``: ADDT fine-tuning on Ray Train (``TorchTrainer``, DDP), resumable.

Stages (flows/train_addt.py runs them as Prefect tasks):

1. :func:`plan_training`: choose the training images (labels required: CGPO attacks the true
   label), check them and the models' sources, and record the run in OUT: ``config.yaml``,
   ``manifest.parquet``, ``run.json``. An OUT holding another config is refused (``steps`` is
   operational: raising it continues a finished run);
2. :func:`run_training`: N Ray Train workers (one GPU each where Ray has GPUs, else CPU workers
   with ``gloo``) run :func:`train_loop_per_worker`: every worker loads the UNet and the frozen
   classifier, resumes from ``ray.train.get_checkpoint()``, and trains its equal slice of each
   step's global batch (:class:`densepure_core.addt.trainer.AddtTrainer`). Every
   ``checkpoint_every`` steps (and at the last) rank 0 writes the metrics since the previous
   checkpoint (``OUT/metrics/steps=<a>-<b>.parquet``) and reports a checkpoint
   ``OUT/train/step-<N>/``: ``unet/`` + ``scheduler/`` + ``model_index.json`` (the EMA weights,
   a diffusers DDPMPipeline folder that ``densepure certify`` and ``attack`` load) and
   ``training_state.pt`` (raw weights, optimiser, EMA, gradient scaler, step).
   Ray Train keeps the last ``keep_checkpoints`` and restores from the newest one both when a
   worker dies (``max_failures``) and when the whole run is started again on the same OUT (its
   snapshot ``OUT/train/checkpoint_manager_snapshot.json``). Draws are keyed by (seed, step,
   example), so the resumed run continues the same trajectory;
3. :func:`export_model`: copy the final checkpoint's model to ``OUT/model/`` and finish
   ``run.json``.

Progress (step, loss, steps/s, ETA) comes from rank 0 through a Ray queue to the driver.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from densepure_core.config.addt import AddtConfig
from densepure_core.data.sources import ImageRecord, enumerate_records, select_records
from tasks.common import storage
from tasks.common.faults import fault_point
from tasks.common.layout import TRAIN_METRICS_SCHEMA, checkpoint_name
from tasks.common.planning import (
    PlanError,
    check_files_exist,
    check_labels,
    differing_fields,
    library_versions,
    source_hashes,
    write_manifest,
)
from tasks.common.run_dir import RunDir

__all__ = ["TrainPlan", "TrainProgress", "plan_training", "run_training", "train_loop_per_worker", "export_model",
           "latest_checkpoint", "is_train_out", "STATE_FILE"]

log = logging.getLogger("densepure.train_addt")

STATE_FILE = "training_state.pt"
_MODEL_FILES = ("model_index.json", "unet/", "scheduler/")


@dataclass(frozen=True)
class TrainPlan:
    run: RunDir
    run_id: str
    config_hash: str
    records: list[ImageRecord]
    resumed: bool = False


@dataclass(frozen=True)
class TrainProgress:
    """One progress message from rank 0: steps done of ``total``, the last loss, rank 0's step time."""

    step: int
    total: int
    loss: float
    seconds: float
    checkpoint: str | None = None


# -- stage 1: the plan ------------------------------------------------------------------------

def _check_same_job(run: RunDir) -> dict:
    """The stored config of OUT; refuse an OUT of another job."""
    stored = run.read_config() or {}
    if stored.get("job") != "train-addt":
        kind = "an attack evaluation" if stored.get("job") == "attack" else "a certification run"
        raise PlanError(f"an ADDT training run needs its own OUT, but {run} holds {kind}: choose another --out")
    return stored


def _check_same_run(cfg: AddtConfig, run: RunDir) -> None:
    from densepure_core.addt.trainer import DRAWS_VERSION

    stored_cfg = AddtConfig.model_validate(_check_same_job(run))
    meta = run.read_run()
    if meta is not None:  # absent: the plan was cut short before it was written
        version = meta.get("draws_version", 1)  # 1: written before it existed
        if version != DRAWS_VERSION:
            raise PlanError(f"{run} was trained with ADDT draws version {version} and this densepure draws version "
                            f"{DRAWS_VERSION} (field that differs: draws_version; version 1 reused one CGPO noise draw "
                            f"for every iteration, version 2 draws fresh noise each iteration as the reference code). "
                            f"Its checkpoints cannot be continued with other draws: use a new --out (its model and "
                            f"metrics stay readable).")
    if stored_cfg.config_hash() == cfg.config_hash():
        return
    diff = differing_fields(stored_cfg, cfg)
    raise PlanError(f"a different ADDT config was already trained in {run} (fields that differ: {', '.join(diff)};"
                    f" stored config_hash {stored_cfg.config_hash()}, this one {cfg.config_hash()}). Checkpoints of "
                    f"different configs are never mixed: choose another --out, or rerun with the stored config "
                    f"({run.config_uri}) to resume it (raising steps is allowed: it continues the run).")


def _check_models(cfg: AddtConfig, first: ImageRecord) -> int:
    """Load both models once on the driver (CPU) and the first image: a wrong source, a broken
    checkpoint or an image the UNet cannot take fails here, before Ray starts. Returns the
    classifier's number of classes."""
    import torch

    from densepure_core.config import resolve_source
    from densepure_core.data.sources import DatasetError, load_image
    from densepure_core.models import ModelLoadError, load_classifier, load_diffusion
    from tasks.common.workers import check_image_fits

    c = cfg.classifier
    try:
        dm = load_diffusion(resolve_source(cfg.diffusion.source), allow_pickle=cfg.allow_pickle)
        clf = load_classifier(resolve_source(c.source), num_classes=c.num_classes, model_name=c.model_name,
                              input_size=c.input_size, interpolation=c.interpolation, mean=c.mean, std=c.std,
                              allow_pickle=cfg.allow_pickle)
        image = load_image(first, cfg.dataset)
        check_image_fits(image, first, dm.unet)
    except (ModelLoadError, DatasetError) as exc:
        raise PlanError(str(exc)) from exc
    with torch.no_grad():  # the classifier sees what CGPO gives it: an image of this shape in [0, 1]
        return int(clf(image[None]).shape[-1])


def plan_training(cfg: AddtConfig, out: RunDir | str | None = None) -> TrainPlan:
    """Check the images and models, and record the run in ``out`` (default ``cfg.out``).

    Everything checkable is checked before anything is written. An OUT whose run has no
    checkpoint yet (a failed start) takes a changed config: it simply re-plans.
    """
    run = RunDir.of(out or cfg.out)
    if not run.is_s3:  # Ray Train runs each worker in a directory of its own: relative paths would move
        run = RunDir(os.path.abspath(run.root))
    planned = run.exists(run.config_uri)
    resumed = planned and latest_checkpoint(run) is not None
    if resumed:
        _check_same_run(cfg, run)
    elif planned:
        _check_same_job(run)
    records, _ = enumerate_records(cfg.dataset)
    chosen = select_records(records, cfg.dataset)
    check_files_exist(chosen, "fail")  # a training batch cannot skip an image: every one must exist
    unknown = [r for r in chosen if r.label < 0]
    if unknown:
        raise PlanError(f"training image {unknown[0].image_id!r} ({unknown[0].uri}) has no label (-1), and "
                        f"{len(unknown)} image(s) in all: CGPO maximises the classifier's loss on the true label. "
                        f"Label them, or choose labelled images (dataset.start/every/max_images).")
    width = _check_models(cfg, chosen[0])
    check_labels(chosen, width, f"the classifier has {width} outputs", PlanError)
    if len(chosen) < cfg.batch_size:
        log.warning("%d training images < batch_size %d: a batch repeats images (across epochs)", len(chosen),
                    cfg.batch_size)
    meta = run.read_run() if resumed else None
    run_id = meta["run_id"] if meta else f"{cfg.run_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    plan = TrainPlan(run, run_id, cfg.config_hash(), chosen, resumed=meta is not None)
    run.write_text(run.config_uri, cfg.model_copy(update={"out": run.root}).to_yaml())
    write_manifest(run, chosen, len(chosen))
    if meta is None:
        from densepure_core.addt.trainer import DRAWS_VERSION

        run.write_run({"job": "train-addt", "run_id": run_id, "config_hash": plan.config_hash,
                       "draws_version": DRAWS_VERSION, "images": len(chosen),
                       "model_hashes": source_hashes({cfg.diffusion.source, cfg.classifier.source}),
                       "host": socket.gethostname(), "created_at": datetime.now(timezone.utc).isoformat(),
                       "versions": library_versions()})
    return plan


# -- stage 2: the Ray Train loop ---------------------------------------------------------------

class _Images:
    """The training images by position, decoded on first use and kept (a bounded cache)."""

    def __init__(self, records: list[ImageRecord], dataset, cache: int = 50_000):
        from functools import lru_cache

        from densepure_core.data.sources import load_image

        self.records = records
        self.get = lru_cache(maxsize=cache)(lambda i: load_image(records[i], dataset))


def _write_metrics(run: RunDir, run_id: str, rows: list[dict], workers: int) -> None:
    now = datetime.now(timezone.utc)
    table = pa.Table.from_pylist([{**{k: r[k] for k in ("step", "loss", "grad_norm", "lr", "ema_decay", "mix_mean",
                                                        "seconds")}, "run_id": run_id, "workers": workers,
                                   "created_at": now} for r in rows], schema=TRAIN_METRICS_SCHEMA)
    run.write_parquet(run.metrics_uri(rows[0]["step"], rows[-1]["step"]), table)


def _drop_metrics_after(run: RunDir, step: int) -> None:
    """Remove metrics files of steps after ``step`` (the checkpoint a run resumes from): written
    by a run killed before its next checkpoint was saved. Same-named files would be rewritten
    anyway; this also covers a rerun with another ``checkpoint_every``, whose file ranges differ."""
    for uri in run.metrics_files():
        last = int(posixpath.basename(uri).removesuffix(".parquet").rsplit("-", 1)[1])
        if last > step:
            run.remove(uri)


def _save_checkpoint(trainer, scheduler, folder: str) -> None:
    import torch
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=trainer.ema_unet(), scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    torch.save(trainer.state_dict(), os.path.join(folder, STATE_FILE))


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker (see the module docstring). ``config``: cfg, run (a RunDir), run_id, records, queue."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from densepure_core.addt.trainer import AddtTrainer, batch_positions, step_draws
    from densepure_core.config import resolve_source
    from densepure_core.models import load_classifier, load_diffusion

    cfg = AddtConfig.model_validate(config["cfg"])
    run, run_id, queue = config["run"], config["run_id"], config.get("queue")
    records = [ImageRecord(*r) for r in config["records"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    dm = load_diffusion(resolve_source(cfg.diffusion.source), device=device, allow_pickle=cfg.allow_pickle)
    c = cfg.classifier
    classifier = load_classifier(resolve_source(c.source), num_classes=c.num_classes, model_name=c.model_name,
                                 input_size=c.input_size, interpolation=c.interpolation, mean=c.mean, std=c.std,
                                 device=device, allow_pickle=cfg.allow_pickle)
    unet = dm.unet.train().requires_grad_(True)
    ddp = ray.train.torch.prepare_model(unet, move_to_device=False) if world > 1 else unet
    trainer = AddtTrainer(cfg, unet, dm.scheduler.alphas_cumprod, classifier, forward_model=ddp, rank=rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), map_location=device,
                                               weights_only=True))
    if rank == 0:
        _drop_metrics_after(run, trainer.step)
    images = _Images(records, cfg.dataset)
    shape = tuple(images.get(0).shape)
    labels = torch.tensor([r.label for r in records], dtype=torch.long)
    per = cfg.batch_size // world
    mine = range(rank * per, (rank + 1) * per)
    num_timesteps = len(dm.scheduler.alphas_cumprod)
    pending: list[dict] = []
    while trainer.step < cfg.steps:
        step = trainer.step
        positions = batch_positions(cfg.seed, step, cfg.batch_size, len(records))[mine.start:mine.stop]
        x = torch.stack([images.get(int(p)) for p in positions])
        draws = step_draws(cfg.seed, step, mine, shape, num_timesteps, device, iterations=cfg.cgpo_iterations)
        metrics = trainer.train_step(x, labels[torch.as_tensor(positions.astype(np.int64))], draws)
        if world > 1:  # the logged loss is the global batch's, as the gradient
            loss = torch.tensor([metrics["loss"]], device=device)
            dist.all_reduce(loss)
            metrics["loss"] = float(loss) / world
        pending.append(metrics)
        fault_point("train:after-step")
        done = trainer.step
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            name = checkpoint_name(done)
            if rank == 0:
                _write_metrics(run, run_id, pending, world)
                with tempfile.TemporaryDirectory() as folder:
                    _save_checkpoint(trainer, dm.scheduler, folder)
                    ray.train.report({"step": done, "loss": metrics["loss"]},
                                     checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
            else:
                ray.train.report({"step": done, "loss": metrics["loss"]})
            pending = []
            if rank == 0 and queue is not None:
                queue.put(TrainProgress(done, cfg.steps, metrics["loss"], metrics["seconds"], name))
        elif rank == 0 and queue is not None and done % cfg.log_every == 0:
            queue.put(TrainProgress(done, cfg.steps, metrics["loss"], metrics["seconds"]))


def _storage(run: RunDir):
    """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig: OUT itself, local or S3."""
    if run.is_s3:
        import pyarrow.fs as pafs

        return run.root[len("s3://"):], pafs.PyFileSystem(pafs.FSSpecHandler(run.fs))
    return os.path.abspath(run.root), None


def run_training(cfg: AddtConfig, plan: TrainPlan, *, ray_address: str | None = None,
                 on_progress: Callable[[TrainProgress], None] | None = None) -> str:
    """Train to ``cfg.steps`` on Ray Train; returns the name of the final checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from tasks.common.raypool import _start_local_ray, join_ray

    started_here, temp_dir = not ray.is_initialized(), None
    if started_here:
        if ray_address:
            join_ray(ray_address)
        else:
            temp_dir = _start_local_ray(max(os.cpu_count() or 1, cfg.workers))
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
        if cfg.device == "cuda" and gpus < cfg.workers:
            raise PlanError(f"device: cuda with {cfg.workers} worker(s), but the Ray cluster has {gpus} GPU(s): "
                            f"lower workers, or join a cluster with GPUs (--ray-address)")
        threads = cfg.threads_per_worker or (None if use_gpu else max(1, cpus // cfg.workers))
        queue = Queue(actor_options={"num_cpus": 0})
        stop = threading.Event()

        def pump() -> None:  # progress from rank 0, printed by the driver while fit() blocks
            while not stop.is_set():
                try:
                    msg = queue.get(timeout=0.5)
                except Empty:
                    continue
                except Exception:  # the queue actor is gone: the run is ending
                    return
                if on_progress:
                    on_progress(msg)

        reader = threading.Thread(target=pump, name="addt-progress", daemon=True)
        reader.start()
        storage_path, filesystem = _storage(plan.run)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "run": plan.run, "run_id": plan.run_id,
                               "records": [(r.image_id, r.uri, r.label) for r in plan.records], "queue": queue,
                               "threads": threads},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                                   resources_per_worker=None if use_gpu else {"CPU": 1}),
            run_config=ray.train.RunConfig(
                name="train", storage_path=storage_path, storage_filesystem=filesystem,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)))
        try:
            result = trainer.fit()
        finally:
            time.sleep(0.6)  # let the reader drain the last messages
            stop.set()
            reader.join(timeout=2)
        if result.error:
            raise result.error
        final = latest_checkpoint(plan.run)
        if final is None or int(final.rsplit("-", 1)[1]) < cfg.steps:
            raise RuntimeError(f"training ended without a checkpoint at step {cfg.steps} under {plan.run.train_dir}"
                               f" (latest: {final}); rerun the same command to resume")
        return final
    finally:
        if started_here:
            ray.shutdown()
        if temp_dir:  # the local session's logs and sockets: nothing in them is needed after the run
            shutil.rmtree(temp_dir, ignore_errors=True)


def latest_checkpoint(out: RunDir | str) -> str | None:
    """The newest complete checkpoint under ``OUT/train`` (a ``step-<N>`` name), or None.

    Complete: Ray Train names it in its snapshot, which it writes only after the upload.
    """
    run = RunDir.of(out)
    snapshot = storage.join(run.train_dir, "checkpoint_manager_snapshot.json")
    if not run.exists(snapshot):
        return None
    latest = json.loads(run.read_text(snapshot)).get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


# -- stage 3: the model -----------------------------------------------------------------------

def export_model(cfg: AddtConfig, plan: TrainPlan, checkpoint: str, seconds: float) -> str:
    """Copy checkpoint ``checkpoint``'s model (EMA weights) to ``OUT/model/``; finish run.json.

    Returns the model's URI, a diffusion source for ``densepure certify`` / ``attack``.
    """
    run = plan.run
    src = storage.join(run.train_dir, checkpoint)
    dest = run.model_dir
    fs, src_path = storage.split_uri(src, run.fs)
    prefix = "s3://" if run.is_s3 else ""
    for path in sorted(fs.find(src_path)):
        rel = posixpath.relpath(path, src_path) if prefix else os.path.relpath(path, src_path)
        if rel == STATE_FILE or not rel.startswith(_MODEL_FILES):
            continue
        run.write_bytes(storage.join(dest, *rel.split(os.sep)), run.read_bytes(prefix + path))
    meta = run.read_run()
    meta.update({"steps": cfg.steps, "checkpoint": checkpoint, "model": dest, "workers": cfg.workers,
                 "last_train_seconds": round(seconds, 2), "finished_at": datetime.now(timezone.utc).isoformat()})
    run.write_run(meta)
    return dest


def is_train_out(out: RunDir | str) -> bool:
    """Whether OUT holds an ADDT training run (its config.yaml says job: train-addt)."""
    return RunDir.of(out).job() == "train-addt"
