"""Benchmark of SQL over a run store: how long ``densepure sql STORE`` takes on many runs.

Run it (a store of 1,000 runs of the default size in a temporary directory; ~1 min to build)::

    .venv/bin/python benchmarks/run_store.py               # 1,000 runs
    .venv/bin/python benchmarks/run_store.py --runs 50     # a quick one; --dry-run: 5 runs (the test)

A run of the default size is what ``make demo`` writes: 30 images, 2 sigmas x 3 methods, shards of
10, so 18 vote files, the certificates and accuracy tables, config.yaml, run.json and a manifest.
One such run is made with the real aggregate stage over synthetic votes (tests/votes_factory.py,
n0 = 100, n = 500, 10 classes) and copied N times, each copy with its own run id, start time and
status in run.json (a tenth of them failed, a tenth partial: no tables), and its run id in every
Parquet row.

Each query is timed end to end through :func:`tasks.query.run_query` in this process (listing the
store once, reading every run.json and config.yaml, registering the lazy views, running the SQL):

- ``runs``: ``SELECT status, count(*) FROM runs GROUP BY status``;
- ``accuracy``: certified accuracy at r = 0.5 of one partition in every run, joined to ``runs``.

The last line is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from votes_factory import make_votes, write_votes  # noqa: E402

from tasks.certify.aggregate import aggregate  # noqa: E402
from tasks.common.run_dir import RunDir  # noqa: E402
from tasks.query import run_query  # noqa: E402

SIGMAS = (0.25, 0.5)
METHODS = ("rs-noise-trained", "dds", "densepure-k5-s2")


def template_run(out: Path) -> None:
    """One run of the default size: 18 vote files, published tables, the plan's files."""
    for i, sigma in enumerate(SIGMAS):
        for j, method in enumerate(METHODS):
            table = make_votes(30, 10, sigma=sigma, method=method, n=500, seed=10 * i + j, run_id="template")
            write_votes(str(out), table, shard_size=10)
    aggregate(str(out), alpha=0.001)
    run = RunDir(str(out))
    run.write_text(run.config_uri, "run_name: digits-default\nn: 500\ndataset: {kind: digits, every: 15}\n")
    (out / "manifest.parquet").write_bytes(b"")  # present, as in a real run (never read by the views)


def _relabel(path: Path, run_id: str) -> None:
    table = pq.read_table(path)
    i = table.schema.get_field_index("run_id")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array([run_id] * table.num_rows, pa.string())), path)


def build_store(store: Path, runs: int) -> float:
    start = time.perf_counter()
    template = store / "_template"
    template_run(template)
    t0 = datetime(2026, 1, 1, 3, tzinfo=timezone.utc)
    for i in range(runs):
        when = t0 + timedelta(days=i)
        out = store / f"{when:%Y%m%dT%H%M%SZ}-nightly-{i:04d}"
        shutil.copytree(template, out)
        for f in out.rglob("*.parquet"):
            if f.name != "manifest.parquet":
                _relabel(f, f"nightly-{i:04d}")
        status = "failed" if i % 10 == 3 else "running" if i % 10 == 7 else "complete"
        if status == "running":
            shutil.rmtree(out / "tables")
        meta = {"run_id": f"nightly-{i:04d}", "config_hash": "0123456789abcdef", "images": 30,
                "created_at": when.isoformat(), "status": status,
                "model_fingerprints": {"bundled:digits/ddpm": "f" * 16}}
        if status != "running":
            meta["ended_at"] = (when + timedelta(minutes=2)).isoformat()
        if status == "complete":
            meta["tables"] = {"alpha": 0.001}
        (out / "run.json").write_text(json.dumps(meta))
    shutil.rmtree(template)
    return time.perf_counter() - start


def timed(store: Path, sql: str) -> tuple[float, str]:
    start = time.perf_counter()
    text = run_query([str(store)], sql, fmt="csv")
    return time.perf_counter() - start, text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--dry-run", action="store_true", help="5 runs (the test)")
    args = parser.parse_args(argv)
    runs = 5 if args.dry_run else args.runs
    with tempfile.TemporaryDirectory(prefix="dp-store-") as tmp:
        store = Path(tmp) / "store"
        built = build_store(store, runs)
        files = sum(1 for _ in store.rglob("*") if _.is_file())
        print(f"built a store of {runs:,} runs ({files:,} files) in {built:.1f} s")
        s_runs, text = timed(store, "SELECT status, count(*) AS runs FROM runs GROUP BY status ORDER BY status")
        print(f"[runs] {s_runs:.2f} s\n{text}")
        s_acc, text = timed(store, "SELECT r.started_at, a.certified_accuracy FROM accuracy a JOIN runs r USING "
                                   "(run_id) WHERE a.radius = 0.5 AND a.sigma = 0.5 AND a.method = 'dds' "
                                   "ORDER BY r.started_at")
        lines = text.splitlines()
        print(f"[accuracy] {s_acc:.2f} s, {len(lines) - 1} rows")
    result = {"runs": runs, "files": files, "seconds_runs_query": round(s_runs, 2),
              "seconds_accuracy_query": round(s_acc, 2)}
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
