"""Pipeline overhead: the same certification work through the full flow and through a bare loop.

    .venv/bin/python benchmarks/pipeline_overhead.py [--config FILE|PRESET] [--set k=v ...]

(a) the full pipeline: Prefect flow (temporary local server), plan, Ray actor pool on loopback,
    atomic Parquet shards, DuckDB aggregate, report; timed end to end, start-up included;
(b) the bare core loop in one process: load the models once, then for every (sigma, method) and
    image call SmoothedBaseClassifier.selection_and_estimation; no Prefect, Ray, Parquet or DuckDB.

Both certify the same images with the same seeds, so the counts must agree (checked). Prints
the throughput ratio (b's seconds / a's seconds); last line ``key=value`` pairs. Target: >= 0.85
on the 2-core dev machine for a workload of a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bare_loop(cfg, plan) -> tuple[float, dict]:
    import torch

    from densepure_core.data.sources import load_image
    from tasks.certify.vote import VoteWorker

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    worker = VoteWorker(cfg, plan.num_classes, "bare")
    counts = {}
    for sigma, label in plan.partitions:
        sbc = worker.smoothed(worker.method(label), sigma)
        for rec in plan.records:
            x = load_image(rec, cfg.dataset)
            c0, c, _ = sbc.selection_and_estimation(x, rec.image_id, cfg.n0, cfg.n)
            counts[(sigma, label, rec.image_id)] = (c0.tolist(), c.tolist())
    return time.perf_counter() - start, counts


def flow_counts(out: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(out, "votes"), partitioning=None)
    return {(r["sigma"], r["method"], r["image_id"]): (r["counts0"], r["counts"])
            for r in table.select(["sigma", "method", "image_id", "counts0", "counts"]).to_pylist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="YAML file or packaged preset (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="densepure-bench-prefect-"))
    from flows.environment import apply_environment_defaults

    apply_environment_defaults()  # before flows.certify imports Prefect
    from densepure_core.config import load_config
    from flows.certify import run_certify
    from tasks.certify.plan import plan_run

    cfg = load_config(args.config, args.overrides)
    work = tempfile.mkdtemp(prefix="densepure-overhead-")
    out_flow = os.path.join(work, "flow")

    t0 = time.perf_counter()
    result = run_certify(cfg, out=out_flow, progress=False)
    flow_seconds = time.perf_counter() - t0
    print(f"full flow: {flow_seconds:.1f} s  (stages: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items()) + ")")

    plan = plan_run(cfg, os.path.join(work, "bare-plan"))
    bare_seconds, bare = bare_loop(cfg, plan)
    print(f"bare core loop: {bare_seconds:.1f} s  ({len(plan.records)} images x {len(plan.partitions)} partitions)")

    same = flow_counts(out_flow) == bare
    print(f"counts identical: {same}")
    ratio = bare_seconds / flow_seconds
    print(f"flow_seconds={flow_seconds:.1f} bare_seconds={bare_seconds:.1f} ratio={ratio:.3f} counts_identical={same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
