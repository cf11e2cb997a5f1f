"""``densepure certify --ray-address`` on a real two-node Ray cluster (``ray start --head`` and a
second ``ray start --address``) on this machine: shards run on both nodes, and the certificates
equal those of a single-node run.

Why a network namespace: a single local Ray stays on loopback (tasks/common/raypool.py), but Ray
refuses multi-node clusters in that mode, and otherwise rewrites 127.0.0.1 to the machine's own
non-loopback address and dials it. Nothing here may dial anything but loopback, so the whole
test (both nodes, the drivers, Prefect's temporary server) runs inside ``unshare -n -p``: a
network namespace that has only ``lo`` and a PID namespace whose processes all end when its
first process does (``--kill-child``: when ``unshare`` is stopped, by PID, also on a failing or
timed-out test). Needs root (or CAP_SYS_ADMIN); without it the test is skipped, saying so.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile

import pyarrow.parquet as pq
import pytest
import yaml
from model_factory import tiny_job
from server_procs import ROOT, child_env, log_tail, started

pytestmark = pytest.mark.servers

UNSHARE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]

# Runs inside the namespace. The single-node reference run (local Ray, one actor) overlaps the
# cluster's start-up; the cluster run (two actors: 0.5 CPU each, one node has 1 CPU, so Ray's
# default scheduling puts one on each node) follows it: the two share a fresh PREFECT_HOME, and
# the first one migrates its database.
SCRIPT = r"""
set -euo pipefail
ip link set lo up
ip -o addr show > "$WORK/addresses"   # what this namespace can reach: loopback only
densepure certify --config "$JOB" --set workers=1 --out "$WORK/single" > "$WORK/single.log" 2>&1 &
reference=$!
ray start --head --port=6379 --num-cpus=1 --include-dashboard=false --disable-usage-stats \
  --node-ip-address=127.0.0.1 --temp-dir="$RAY_TEMP" > "$WORK/head.log" 2>&1
ray start --address=127.0.0.1:6379 --num-cpus=1 --disable-usage-stats --node-ip-address=127.0.0.1 \
  > "$WORK/node2.log" 2>&1
python - <<'EOF'
import json, os, time
import ray
ray.init(address="127.0.0.1:6379", log_to_driver=False)
deadline = time.monotonic() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
nodes = [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0)}
         for n in ray.nodes() if n["Alive"]]
open(os.path.join(os.environ["WORK"], "nodes.json"), "w").write(json.dumps(nodes))
EOF
wait "$reference" || { echo "single-node run failed"; tail -40 "$WORK/single.log"; exit 1; }
densepure certify --config "$JOB" --set workers=2 --out "$WORK/cluster" --ray-address 127.0.0.1:6379 \
  > "$WORK/cluster.log" 2>&1 \
  || { echo "cluster run failed"; tail -40 "$WORK/cluster.log"; exit 1; }
"""

# Columns that say when, how fast or where a row was computed, not what was certified.
VOLATILE = {"seconds", "worker", "created_at", "run_id", "time"}


def _netns_unavailable() -> str | None:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (util-linux, iproute2) is not installed"
    probe = subprocess.run([*UNSHARE, "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot create a network namespace: {probe.stderr.strip()}"


def _rows(path) -> list[dict]:
    table = pq.read_table(path)
    keep = [c for c in table.column_names if c not in VOLATILE]
    return sorted((tuple(sorted(r.items())) for r in table.select(keep).to_pylist()), key=repr)


def test_certify_on_a_two_node_cluster_uses_both_nodes_and_equals_a_single_node_run(tmp_path):
    why = _netns_unavailable()
    if why:
        pytest.skip(f"a two-node Ray cluster needs a loopback-only network namespace: {why}")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tmp_path, sigmas=[0.5], methods=[{"kind": "rs"}, {"kind": "dds"}])))
    # 6 images in 3 shards x 2 methods: 6 tasks for the actors.
    script = tmp_path / "cluster.sh"
    script.write_text(SCRIPT)
    # Ray's socket paths must fit in 107 bytes: a short temp dir, not tmp_path.
    ray_temp = tempfile.mkdtemp(prefix="dp-rc-")
    env = child_env(JOB=str(job), WORK=str(tmp_path), RAY_TEMP=ray_temp, HOME=str(tmp_path),
                    PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=None,
                    # Ray's token auth: the second node and the drivers present this token.
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                    # Unset: with it, multi-node Ray refuses to start (environment.md).
                    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=None, RAY_ADDRESS=None)
    log = tmp_path / "namespace.log"
    try:
        with started([*UNSHARE, "bash", str(script)], env=env, log=log, cwd=ROOT) as proc:
            try:
                proc.wait(timeout=420)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the cluster test did not finish in 420 s:\n{log_tail(log)}\n"
                            f"{log_tail(tmp_path / 'cluster.log')}")
        assert proc.returncode == 0, log_tail(log)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)

    addresses = (tmp_path / "addresses").read_text().split()
    assert {a for a in addresses if "/" in a} <= {"127.0.0.1/8", "::1/128"}, addresses  # lo only
    nodes = json.loads((tmp_path / "nodes.json").read_text())
    assert len(nodes) == 2 and {n["ip"] for n in nodes} == {"127.0.0.1"}, nodes
    out = tmp_path / "cluster"
    workers = {w for f in (out / "votes").rglob("*.parquet") for w in pq.read_table(f).column("worker").to_pylist()}
    # worker = actor-<i>@<host>/<first 8 hex digits of the Ray node id>: both nodes voted.
    assert {w.rsplit("/", 1)[1] for w in workers} == {n["id"][:8] for n in nodes}, (workers, nodes)
    for table in ("certificates", "accuracy"):
        single = _rows(tmp_path / "single" / "tables" / f"{table}.parquet")
        assert single and _rows(out / "tables" / f"{table}.parquet") == single, table
