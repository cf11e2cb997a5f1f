"""A run store: one prefix (a folder or ``s3://`` prefix) that holds many runs, each in its own OUT.

Scheduled runs of a deployment write under the deployment's prefix, one OUT per run, named so
that they sort by time: ``<STORE>/<UTC start, YYYYmmddTHHMMSSZ>-<name>`` (:func:`store_run`).
A run continues the store's latest run of its job instead when that one is not complete and has
the same config (a long ImageNet run spanning nights; a flow run Prefect retries), so nothing is
computed twice. A manual run joins a store by being written under it (``--out STORE/<name>``).
``densepure sql STORE``, ``densepure compare`` and ``densepure report STORE`` read it.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from tasks.common import storage
from tasks.common.run_dir import RunDir
from tasks.common.run_index import RunFiles, RunIndexError, index_runs

__all__ = ["store_run", "store_runs", "previous_complete", "run_folder_name"]


def store_runs(store: str, job: str | None = None) -> list[RunFiles]:
    """The runs under ``store`` (of ``job`` when given), oldest first; [] for an empty store."""
    try:
        runs = index_runs([store])
    except RunIndexError:
        return []
    return [r for r in runs if job is None or r.job == job]


def _same(a: str, b: str) -> bool:
    if storage.is_s3(a) or storage.is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def run_folder_name(name: str, now: datetime | None = None) -> str:
    """``<UTC time>-<name>``: a store's folders sort by start time (``name`` made path-safe)."""
    now = now or datetime.now(timezone.utc)
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-") or "run"
    return f"{now:%Y%m%dT%H%M%SZ}-{safe}"


def store_run(store: str, job: str, config_hash: str, name: str, now: datetime | None = None) -> RunDir:
    """The OUT a scheduled run of ``job`` writes under ``store`` (see the module docstring)."""
    runs = store_runs(store, job)
    if runs:
        latest = runs[-1]
        if latest.status != "complete" and (latest.meta or {}).get("config_hash") == config_hash:
            return latest.run
    return RunDir(storage.join(store, run_folder_name(name, now)))


def previous_complete(store: str, job: str, before: str | None) -> RunFiles | None:
    """The latest complete run of ``job`` under ``store`` other than the run ``before`` (an OUT
    root), started before it; None when there is none."""
    runs = store_runs(store, job)
    current = next((r for r in runs if before is not None and _same(r.run.root, str(before))), None)
    started = (current.meta or {}).get("created_at") if current else None
    done = [r for r in runs if r is not current and r.status == "complete"
            and (started is None or ((r.meta or {}).get("created_at") or "") < started)]
    return done[-1] if done else None
