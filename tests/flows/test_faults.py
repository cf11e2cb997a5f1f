"""Faults survived, nothing lost: killed actors, SIGKILL of the whole run at four points, reruns.

Every test compares against an undisturbed run of the same config: the final certificates must
be identical, no image twice, none missing, and no shard that was complete at the crash is
recomputed (its file keeps its modification time). Figures are printed (pytest -s shows them)
and recorded in docs/reliability.md.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from model_factory import tiny_job
from typer.testing import CliRunner

from densepure_core.config import load_config
from flows.cli import app
from tasks.certify.plan import plan_run
from tasks.certify.vote import run_vote_stage, shard_is_complete

DENSEPURE = str(Path(sys.executable).parent / "densepure")
CERT_COLUMNS = ["image_id", "sigma", "method", "label", "prediction", "n_a", "n", "p_a_lower", "radius", "correct"]


def _parent(pid):
    try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may contain spaces
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def processes_named(fragment):
    """PIDs of this test's descendants whose command line (Ray sets it to the actor's title)
    contains ``fragment`` (Linux /proc). Only descendants: another Ray cluster on the machine
    (a user's run, a benchmark) is never touched."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fragment not in cmdline:
                continue
            pid = int(entry)
            while pid > 1 and pid != me:
                pid = _parent(pid)
            if pid == me:
                pids.append(int(entry))
    return pids


def job(tmp, **over):
    # One sigma, RS + DDS + DensePure, one image per shard: many shard boundaries to crash at.
    return tiny_job(tmp, sigmas=[0.5], shard_size=1, **over)


def certificates(out):
    table = pq.read_table(Path(out) / "tables" / "certificates.parquet").select(CERT_COLUMNS)
    return sorted(tuple(r.values()) for r in table.to_pylist())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    data = job(tmp)
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["certify", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp, data, certificates(data["out"])


def test_actor_killed_mid_shard(reference, tmp_path):
    """os.kill(SIGKILL) of a vote actor's process mid-run: Ray restarts it and retries its task."""
    _, data, _ = reference
    cfg = load_config(data=dict(job(tmp_path), workers=2))
    plan = plan_run(cfg)
    killed = []

    def kill_an_actor(result):
        if killed:
            return
        actors = processes_named("ray::VoteWorker")
        assert actors, "no vote actor process found"
        os.kill(actors[0], signal.SIGKILL)
        killed.append(actors[0])

    results = run_vote_stage(cfg, plan, on_result=kill_an_actor)
    assert killed
    assert sum(r.images for r in results) == len(plan.records) * len(plan.partitions)
    assert all(shard_is_complete(t)[0] for t in plan.tasks())
    votes = pq.read_table(Path(cfg.out) / "votes", partitioning=None).select(["sigma", "method", "image_id", "counts0", "counts"])
    ref = pq.read_table(Path(data["out"]) / "votes", partitioning=None).select(["sigma", "method", "image_id", "counts0", "counts"])
    assert sorted(map(str, votes.to_pylist())) == sorted(map(str, ref.to_pylist()))
    print(f"\nactor pid {killed[0]} killed; {len(results)} shard tasks, {votes.num_rows} images, counts identical")


# The two vote-stage points run by default; the points before and after the votes are `slow`
# (make test-slow): each costs a whole run and a rerun (~1 min), and the default suite must stay
# under 20 minutes on 2 cores (docs/testing.md).
@pytest.mark.parametrize("point", [pytest.param("plan:after-config", marks=pytest.mark.slow),
                                   "vote:mid-shard@4", "vote:during-write@4",
                                   pytest.param("aggregate:after-certificates", marks=pytest.mark.slow)])
def test_sigkill_of_the_whole_run_then_rerun(point, reference, tmp_path):
    _, _, ref_certs = reference
    data = job(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ, DENSEPURE_FAULT=point, DENSEPURE_FAULT_ONCE=str(tmp_path / "fault.once"),
               PREFECT_LOGGING_LEVEL="ERROR")
    env.pop("DENSEPURE_FAULT_PGID", None)  # the crashing CLI records its own group
    crashed = subprocess.run([DENSEPURE, "certify", "--config", str(config)], env=env, start_new_session=True,
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert (tmp_path / "fault.once").exists()
    out = Path(data["out"])
    complete = {}
    if (out / "run.json").exists():
        for t in plan_run(load_config(config)).tasks():
            if shard_is_complete(t)[0]:
                complete[t.uri] = os.path.getmtime(t.uri)
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]

    rerun = subprocess.run([DENSEPURE, "certify", "--config", str(config)], env=dict(os.environ),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert certificates(out) == ref_certs  # identical tables: no image twice, none missing
    assert {u: os.path.getmtime(u) for u in complete} == complete  # complete shards not recomputed
    votes = pq.read_table(out / "votes", partitioning=None)
    keys = list(zip(votes.column("sigma").to_pylist(), votes.column("method").to_pylist(),
                    votes.column("image_id").to_pylist()))
    assert len(keys) == len(set(keys)) == len(ref_certs)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the rerun removed the kill's temporaries
    print(f"\n{point}: killed (rc {crashed.returncode}); {len(complete)} complete shards kept, "
          f"{len(leftovers)} temporary file(s) left by the kill; rerun identical ({len(ref_certs)} certificates)")
