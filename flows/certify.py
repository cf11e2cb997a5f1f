"""The certification flow: plan -> vote (Ray actors) -> aggregate (DuckDB) -> report.

Run it with ``densepure certify [--config FILE|PRESET] [--out DIR|s3://...]``; with no config it
runs the packaged default (``densepure_core/config/presets/default.yaml``). Without ``PREFECT_API_URL`` Prefect starts a
temporary local server for the run (no server to manage); with it, runs are recorded there.

Rerunning the same command on the same OUT finishes only what is missing (see tasks/certify/plan.py).
"""

from __future__ import annotations

import os
import time

# Importing this module sets no environment variable: Prefect reads its settings when it is
# imported (just below), so the quiet local defaults (flows/environment.py) are applied by the
# entry points before they import this module (the CLI does; scripts call
# flows.environment.apply_environment_defaults() first).
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from densepure_core.config import CertifyConfig, load_config
from tasks.certify import aggregate as aggregate_mod
from tasks.certify import report as report_mod
from tasks.certify.plan import Plan, plan_run, plan_summary, record_published_tables
from tasks.certify.vote import ShardResult, run_vote_stage
from tasks.common.quarantine import quarantined_counts
from flows.progress import ShardProgress
from tasks.common.run_dir import RunDir

__all__ = ["certify_flow", "certify_config_file", "run_certify"]


@task(name="plan")
def plan_task(cfg: CertifyConfig, run: RunDir) -> Plan:
    plan = plan_run(cfg, run)
    get_run_logger().info("plan: %s", plan_summary(plan))
    return plan


@task(name="vote")
def vote_task(cfg: CertifyConfig, plan: Plan, ray_address: str | None, progress: bool) -> list[ShardResult]:
    total = len(plan.records) * len(plan.partitions)
    printer = ShardProgress(total, "vote", "images", lambda r: f"sigma={r.sigma} {r.method} shard {r.shard}") \
        if progress else None
    artifact = create_progress_artifact(0.0, key="densepure-vote-progress", description="images voted (%)")
    done = 0

    def on_result(res: ShardResult) -> None:
        nonlocal done
        done += res.images + res.quarantined
        if printer:
            printer(res)
        update_progress_artifact(artifact, 100.0 * done / max(1, total))

    results = run_vote_stage(cfg, plan, ray_address=ray_address, on_result=on_result)
    if printer:
        printer.finish()
    logger = get_run_logger()
    recomputed = [r for r in results if r.recomputed_reason]
    for r in recomputed:
        logger.warning("recomputed shard sigma=%s %s %s: %s", r.sigma, r.method, r.shard, r.recomputed_reason)
    logger.info("vote: %d shards computed, %d already complete",
                sum(not r.skipped for r in results), sum(r.skipped for r in results))
    return results


@task(name="aggregate")
def aggregate_task(run: RunDir, alpha: float, radii: list[float], expected: dict, allow_partial: bool,
                   quarantined: dict):
    result = aggregate_mod.aggregate(run, alpha=alpha, radii=radii, expected=expected, allow_partial=allow_partial,
                                     quarantined=quarantined)
    record_published_tables(run, result.alpha, list(result.radii))  # config.yaml says the tables' alpha
    return result


@task(name="report")
def report_task(run: RunDir) -> str:
    return report_mod.write_report(run)


@flow(name="densepure-certify")
def certify_flow(config: dict, out: str | None = None, ray_address: str | None = None,
                 allow_partial: bool = False, progress: bool = True) -> dict:
    """Certify the dataset of ``config``; returns per-stage seconds and the output location."""
    cfg = CertifyConfig.model_validate(config)
    run = RunDir(out or cfg.out)  # the run's one handle, from here down
    with run.lease(f"densepure certify, run name {cfg.run_name!r}") as lease:  # one run per OUT at a time
        timings = {}
        t0 = time.perf_counter()
        plan = plan_task(cfg, run)
        timings["plan"] = time.perf_counter() - t0
        with run.running() as status:  # run.json says running, then complete, partial or failed
            t0 = time.perf_counter()
            results = vote_task(cfg, plan, ray_address, progress)
            timings["vote"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            lease.check()  # a run that lost its lease publishes nothing
            quarantined = quarantined_counts(run)
            expected = {p: n - quarantined.get(p, 0) for p, n in plan.expected_images().items()}
            status.partial = aggregate_task(run, cfg.alpha, cfg.radii, expected, allow_partial,
                                            quarantined).partial
            timings["aggregate"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = report_task(run)
            timings["report"] = time.perf_counter() - t0
            create_markdown_artifact(report, key="densepure-report", description=f"certification report for {run}")
            create_table_artifact([{"stage": k, "seconds": round(v, 2)} for k, v in timings.items()],
                                  key="densepure-stage-timings")
            plot_url = run.plot_uri if run.is_s3 else f"file://{os.path.abspath(run.plot_uri)}"
            create_image_artifact(image_url=plot_url, key="densepure-certified-accuracy",
                                  description="certified accuracy vs L2 radius")
            return {
                "out": run.root, "run_id": plan.run_id, "timings": timings, "report": report,
                "computed_shards": sum(not r.skipped for r in results), "skipped_shards": sum(r.skipped for r in results),
                "images": len(plan.records), "quarantined": sum(quarantined.values()),
            }


@flow(name="densepure-certify-file")
def certify_config_file(config_path: str = "default", out: str | None = None,
                        overrides: list[str] | None = None, ray_address: str | None = None,
                        store: str | None = None) -> dict:
    """Deployment entry point (prefect.yaml): certify the config at ``config_path`` (a YAML file
    or a packaged preset name, see :func:`densepure_core.config.resolve_config_path`).

    ``store`` (without ``out``): the run lands in that run store, in an OUT of its own (or the
    store's unfinished run of this config), and is compared with the store's previous complete
    run (flows/stored.py)."""
    from flows.stored import compare_with_previous, out_in_store

    cfg = load_config(config_path, overrides or [])
    if out is None and store:
        out = out_in_store(store, "certify", cfg.config_hash(), cfg.run_name)
    result = certify_flow(cfg.model_dump(mode="json"), out=out, ray_address=ray_address, progress=False)
    if store and out is not None:
        compare_with_previous(store, "certify", result["out"], "densepure-store-run")
    return result


def run_certify(cfg: CertifyConfig, out: str | None = None, ray_address: str | None = None,
                allow_partial: bool = False, progress: bool = True) -> dict:
    """Run :func:`certify_flow` for a validated config (the CLI's entry point)."""
    return certify_flow(cfg.model_dump(mode="json"), out=out, ray_address=ray_address,
                        allow_partial=allow_partial, progress=progress)
