"""The ADDT fine-tuning flow: plan -> train (Ray Train) -> export the model -> report.

Run it with ``densepure train-addt [--config FILE|PRESET] [--out DIR|s3://...]``; with no config
it fine-tunes the bundled digits DDPM with the bundled clean classifier (``addt_default``).
Like the other jobs: Prefect without a server unless ``PREFECT_API_URL`` is set, local Ray on
loopback unless ``--ray-address``, and the same command on the same OUT resumes from the last
checkpoint (tasks/train_addt/train.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from densepure_core.config import load_config
from densepure_core.config.addt import AddtConfig
from tasks.common.run_dir import RunDir
from tasks.train_addt.report import write_train_report
from tasks.train_addt.train import (
    TrainPlan,
    TrainProgress,
    export_model,
    plan_training,
    run_training,
)

__all__ = ["train_addt_flow", "train_addt_config_file", "run_train_addt_job", "TrainPrinter"]


@dataclass
class TrainPrinter:
    """Progress lines on stderr: steps done/total, loss, steps/s and ETA.

    The rate is measured from the first message of this process (after the models loaded, and
    from the resumed step on a resumed run), so it is never skewed by start-up or old steps.
    """

    stream: object = field(default_factory=lambda: sys.stderr)
    first: tuple[int, float] | None = None

    def __call__(self, msg: TrainProgress) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (msg.step, now)
        step0, t0 = self.first
        rate = (msg.step - step0) / (now - t0) if msg.step > step0 and now > t0 else 0.0
        eta = f"ETA {(msg.total - msg.step) / rate:.0f}s" if rate > 0 else "ETA -"
        tail = f"  | checkpoint {msg.checkpoint}" if msg.checkpoint else ""
        print(f"  [train] step {msg.step}/{msg.total} ({100 * msg.step / max(1, msg.total):.0f}%)  loss {msg.loss:.5f}"
              f"  {rate:.2f} steps/s  {eta}{tail}", file=self.stream, flush=True)


@task(name="plan-train-addt")
def plan_task(cfg: AddtConfig, run: RunDir) -> TrainPlan:
    plan = plan_training(cfg, run)
    get_run_logger().info("plan: %s training images, %s steps of %s (resumed: %s)", len(plan.records), cfg.steps,
                          cfg.batch_size, plan.resumed)
    return plan


@task(name="train-addt")
def train_task(cfg: AddtConfig, plan: TrainPlan, ray_address: str | None, progress: bool) -> str:
    printer = TrainPrinter() if progress else None
    artifact = create_progress_artifact(0.0, key="densepure-train-addt-progress", description="ADDT steps done (%)")

    def on_progress(msg: TrainProgress) -> None:
        if printer:
            printer(msg)
        update_progress_artifact(artifact, 100.0 * msg.step / max(1, msg.total))

    return run_training(cfg, plan, ray_address=ray_address, on_progress=on_progress)


@task(name="export-and-report")
def export_task(cfg: AddtConfig, plan: TrainPlan, checkpoint: str, seconds: float) -> tuple[str, str]:
    model = export_model(cfg, plan, checkpoint, seconds)
    return model, write_train_report(plan.run)


@flow(name="densepure-train-addt")
def train_addt_flow(config: dict, out: str | None = None, ray_address: str | None = None,
                    progress: bool = True) -> dict:
    """Fine-tune with ADDT per ``config``; returns the model's URI, the report and stage timings."""
    cfg = AddtConfig.model_validate(config)
    run = RunDir(out or cfg.out)  # the run's one handle, from here down (the plan makes a local root absolute)
    with run.lease(f"densepure train-addt, run name {cfg.run_name!r}") as lease:  # one run per OUT at a time
        timings = {}
        t0 = time.perf_counter()
        plan = plan_task(cfg, run)
        timings["plan"] = time.perf_counter() - t0
        with plan.run.running():  # run.json says running, then complete, partial or failed
            t0 = time.perf_counter()
            checkpoint = train_task(cfg, plan, ray_address, progress)
            timings["train"] = time.perf_counter() - t0
            lease.check()  # a run that lost its lease publishes nothing
            t0 = time.perf_counter()
            model, report = export_task(cfg, plan, checkpoint, timings["train"])
            timings["export"] = time.perf_counter() - t0
            create_markdown_artifact(report, key="densepure-train-addt-report", description=f"ADDT training report for {plan.run}")
            create_table_artifact([{"stage": k, "seconds": round(v, 2)} for k, v in timings.items()],
                                  key="densepure-train-addt-stage-timings")
            return {"out": plan.run.root, "run_id": plan.run_id, "model": model, "checkpoint": checkpoint, "timings": timings,
                    "report": report}


@flow(name="densepure-train-addt-file")
def train_addt_config_file(config_path: str = "addt_default", out: str | None = None,
                           overrides: list[str] | None = None, ray_address: str | None = None) -> dict:
    """Deployment entry point (prefect.yaml): fine-tune with the config at ``config_path`` (a YAML
    file or a packaged preset name)."""
    cfg = load_config(config_path, overrides or [], model=AddtConfig)
    return train_addt_flow(cfg.model_dump(mode="json"), out=out, ray_address=ray_address, progress=False)


def run_train_addt_job(cfg: AddtConfig, out: str | None = None, ray_address: str | None = None,
                       progress: bool = True) -> dict:
    """Run :func:`train_addt_flow` for a validated config (the CLI's entry point)."""
    return train_addt_flow(cfg.model_dump(mode="json"), out=out, ray_address=ray_address, progress=progress)
