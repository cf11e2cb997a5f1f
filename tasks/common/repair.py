"""``densepure repair OUT``: make an OUT that two runs wrote at once hold one run again.

Before runs took a lease on their OUT (tasks/common/lease.py), two runs started together could
both plan and both vote: run.json names the one that planned last, and shards carry either run's
id, so every aggregate refused the OUT ("mixes 2 values of run_id"). Repair keeps what can be
kept and removes the rest, each file atomically:

- a shard file (votes, attack rows, or their errors) written by another run_id with this OUT's
  partition identity (its ``config_hash`` is the partition's hash in run.json, which covers the
  settings and the models' fingerprints) holds exactly the counts this run computes: its keyed
  noise streams depend on the seed and the image ids, not on the run. It is rewritten with
  run.json's run_id (``relabelled``);
- a file written by another run_id with another identity is deleted (``removed``): the next run
  computes the shard again.

Files of run.json's own run are left alone. It holds the lease while it works, so it never races
a running job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.common.planning import PlanError
from tasks.common.run_dir import RunDir

__all__ = ["RepairResult", "repair"]


@dataclass
class RepairResult:
    run_id: str
    checked: int = 0
    relabelled: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _partition_of(run: RunDir, uri: str) -> str:
    """``<s>/<m>`` or ``<d>/<t>/<a>``: the ``key=value`` directories between the kind and the file."""
    rel = uri[len(run.root):].replace("\\", "/").strip("/").split("/")
    return "/".join(part.split("=", 1)[1] for part in rel[1:-1] if "=" in part)


def repair(out: RunDir | str) -> RepairResult:
    """Relabel or remove the shard files of OUT written by another run (see the module docstring)."""
    run = RunDir.of(out)
    meta = run.read_run()
    if meta is None:
        raise PlanError(f"{run} holds no planned run (no run.json): nothing to repair; check the path")
    run_id = meta["run_id"]
    hashes = meta.get("partition_hashes") or {}
    result = RepairResult(run_id)
    with run.lease(f"densepure repair of run {run_id}"):
        files = (run.list_files(run.votes_dir, ".parquet") + run.error_files() + run.attack_files()
                 + run.attack_error_files())
        for uri in files:
            result.checked += 1
            table = pq.read_table(pa.BufferReader(run.read_bytes(uri)))
            if set(table.column("run_id").to_pylist()) <= {run_id}:
                continue
            identity = hashes.get(_partition_of(run, uri), meta["config_hash"])
            if set(table.column("config_hash").to_pylist()) == {identity}:
                index = table.schema.get_field_index("run_id")
                table = table.set_column(index, table.schema.field(index), pa.array([run_id] * table.num_rows,
                                                                                     pa.string()))
                run.write_parquet(uri, table)
                result.relabelled.append(uri)
            else:
                run.remove(uri)
                result.removed.append(uri)
    return result
