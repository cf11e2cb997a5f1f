"""The attack-evaluation flow: plan -> attack (Ray actors) -> summary (DuckDB) -> report.

Run it with ``densepure attack [--config FILE|PRESET] [--out DIR|s3://...]``; with no config it
runs the packaged ``attack_default`` (bundled digits models). Like ``densepure certify``:
Prefect without a server unless ``PREFECT_API_URL`` is set, local Ray on loopback unless
``--ray-address``, and rerunning the same command on the same OUT finishes only what is
missing (tasks/attack/plan.py).
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from densepure_core.config import load_config
from densepure_core.config.attack import AttackConfig
from tasks.attack.plan import AttackPlan, plan_attack
from tasks.attack.summary import write_attack_report
from tasks.attack.worker import AttackShardResult, run_attack_stage
from flows.progress import ShardProgress
from tasks.common.run_dir import RunDir

__all__ = ["attack_flow", "attack_config_file", "run_attack_job"]


@task(name="plan-attack")
def plan_task(cfg: AttackConfig, run: RunDir) -> AttackPlan:
    plan = plan_attack(cfg, run)
    get_run_logger().info("plan: %s images, %s shards, %s partitions (resumed: %s)", len(plan.records),
                          len(plan.shards), len(plan.partitions), plan.resumed)
    return plan


@task(name="attack")
def attack_task(cfg: AttackConfig, plan: AttackPlan, ray_address: str | None, progress: bool) -> list[AttackShardResult]:
    total = len(plan.records) * len(plan.partitions)
    printer = ShardProgress(total, "attack", "image-partitions",
                            lambda r: f"{r.defense} {r.threat} {r.attack} shard {r.shard}") if progress else None
    artifact = create_progress_artifact(0.0, key="densepure-attack-progress", description="image-partitions attacked (%)")
    done = 0

    def on_result(res: AttackShardResult) -> None:
        nonlocal done
        done += res.images + res.quarantined
        if printer:
            printer(res)
        update_progress_artifact(artifact, 100.0 * done / max(1, total))

    results = run_attack_stage(cfg, plan, ray_address=ray_address, on_result=on_result)
    if printer:
        printer.finish()
    for r in results:
        if r.recomputed_reason:
            get_run_logger().warning("recomputed shard %s/%s/%s %s: %s", r.defense, r.threat, r.attack, r.shard,
                                     r.recomputed_reason)
    return results


@task(name="attack-report")
def report_task(run: RunDir, expected: dict) -> str:
    return write_attack_report(run, expected=expected)


@flow(name="densepure-attack")
def attack_flow(config: dict, out: str | None = None, ray_address: str | None = None, progress: bool = True) -> dict:
    """Attack the dataset of ``config``; returns per-stage seconds, the report and counts."""
    cfg = AttackConfig.model_validate(config)
    run = RunDir(out or cfg.out)  # the run's one handle, from here down
    with run.lease(f"densepure attack, run name {cfg.run_name!r}") as lease:  # one run per OUT at a time
        timings = {}
        t0 = time.perf_counter()
        plan = plan_task(cfg, run)
        timings["plan"] = time.perf_counter() - t0
        with run.running():  # run.json says running, then complete, partial or failed
            t0 = time.perf_counter()
            results = attack_task(cfg, plan, ray_address, progress)
            timings["attack"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            lease.check()  # a run that lost its lease publishes nothing
            quarantined: dict = {}
            for r in results:
                quarantined[(r.defense, r.threat, r.attack)] = quarantined.get((r.defense, r.threat, r.attack), 0) + r.quarantined
            expected = {p: len(plan.records) - quarantined.get(p, 0) for p in plan.partitions}
            report = report_task(run, expected)
            timings["report"] = time.perf_counter() - t0
            create_markdown_artifact(report, key="densepure-attack-report", description=f"attack evaluation report for {run}")
            create_table_artifact([{"stage": k, "seconds": round(v, 2)} for k, v in timings.items()],
                                  key="densepure-attack-stage-timings")
            return {"out": run.root, "run_id": plan.run_id, "timings": timings, "report": report,
                    "computed_shards": sum(not r.skipped for r in results), "skipped_shards": sum(r.skipped for r in results),
                    "images": len(plan.records), "quarantined": sum(quarantined.values())}


@flow(name="densepure-attack-file")
def attack_config_file(config_path: str = "attack_default", out: str | None = None,
                       overrides: list[str] | None = None, ray_address: str | None = None,
                       store: str | None = None) -> dict:
    """Deployment entry point (prefect.yaml): attack with the config at ``config_path`` (a YAML
    file or a packaged preset name). ``store`` (without ``out``): as for certify, the run lands
    in that run store and is compared with its previous complete run (flows/stored.py)."""
    from flows.stored import compare_with_previous, out_in_store

    cfg = load_config(config_path, overrides or [], model=AttackConfig)
    if out is None and store:
        out = out_in_store(store, "attack", cfg.config_hash(), cfg.run_name)
    result = attack_flow(cfg.model_dump(mode="json"), out=out, ray_address=ray_address, progress=False)
    if store and out is not None:
        compare_with_previous(store, "attack", result["out"], "densepure-store-run")
    return result


def run_attack_job(cfg: AttackConfig, out: str | None = None, ray_address: str | None = None,
                   progress: bool = True) -> dict:
    """Run :func:`attack_flow` for a validated config (the CLI's entry point)."""
    return attack_flow(cfg.model_dump(mode="json"), out=out, ray_address=ray_address, progress=progress)
