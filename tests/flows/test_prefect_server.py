"""prefect.yaml against a real Prefect server on 127.0.0.1: the work pool of infra/prefect/,
``prefect --no-prompt deploy --all``, a certify run executed by a worker to completion, a
report run, and an active cron schedule that creates runs.

One server for the module (started here, stopped by PID in a ``finally``), with its own
PREFECT_HOME. The server, the CLI and the worker are the commands docs/deploy.md gives.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from model_factory import tiny_job
from netcheck import LOOPBACK, descendants, listening_addresses
from server_procs import ROOT, child_env, free_port, log_tail, started, wait_http

pytestmark = pytest.mark.servers

DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
FLOW_OF = {"flows/certify.py:certify_config_file": "densepure-certify-file",
           "flows/attack.py:attack_config_file": "densepure-attack-file",
           "flows/train_addt.py:train_addt_config_file": "densepure-train-addt-file",
           "flows/report.py:report_flow": "densepure-report"}


def _cli(args: list[str], env: dict, cwd: Path | str = ROOT, timeout: float = 300) -> str:
    run = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{args} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on loopback with the work pool and every deployment of prefect.yaml;
    yields (api url, environment for the CLI and the worker, a scratch dir)."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = child_env(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_UI_ENABLED="false", PREFECT_API_URL=None, DENSEPURE_HOME=str(ROOT),
                    # The scheduler's main loop (default 60 s); its 5 s loop for recently changed
                    # deployments alone sometimes missed a resumed schedule for a minute.
                    PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    log = tmp / "server.log"
    with started(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, log=log) as proc:
        wait_http(f"{api}/health", proc, log)
        sockets = listening_addresses(descendants(proc.pid))
        assert sockets and all(addr in LOOPBACK for addr, _ in sockets), sockets  # the server: loopback only
        env = dict(env, PREFECT_API_URL=api)
        _cli(["infra/prefect/create-work-pool.sh", "densepure", "2"], env)
        _cli(["prefect", "--no-prompt", "deploy", "--all"], env)
        yield api, env, tmp


def _deployment(api: str, name: str) -> dict:
    d = next(d for d in DEPLOYMENTS if d["name"] == name)
    response = httpx.get(f"{api}/deployments/name/{FLOW_OF[d['entrypoint']]}/{name}")
    response.raise_for_status()
    return response.json()


def _run_deployment(api: str, env: dict, name: str, **params: str) -> str:
    """``prefect deployment run`` with parameters; returns the flow run's id."""
    d = next(d for d in DEPLOYMENTS if d["name"] == name)
    args = ["prefect", "deployment", "run", f"{FLOW_OF[d['entrypoint']]}/{name}"]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    return re.search(r"UUID: ([0-9a-f-]{36})", _cli(args, env)).group(1)


def _work(env: dict, tmp: Path) -> None:
    """infra/prefect/start-worker.sh --run-once: takes the runs that are due, waits for them, exits."""
    log = tmp / "worker.log"
    with started(["infra/prefect/start-worker.sh", "--run-once"], env=env, log=log, cwd=ROOT) as worker:
        try:
            worker.wait(timeout=400)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish:\n{log_tail(log)}")
    assert worker.returncode == 0, log_tail(log)


def _state(api: str, run_id: str) -> str:
    return httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"]


def test_every_deployment_is_on_the_server_as_prefect_yaml_says(server):
    api, _, _ = server
    pool = httpx.get(f"{api}/work_pools/densepure").json()
    assert pool["type"] == "process" and pool["concurrency_limit"] == 2
    assert pool["base_job_template"]["variables"]["properties"]["env"]["default"]["OMP_WAIT_POLICY"] == "PASSIVE"
    for d in DEPLOYMENTS:
        got = _deployment(api, d["name"])
        assert got["work_pool_name"] == "densepure"
        assert got["tags"] == d["tags"]
        assert got["parameters"] == d["parameters"]
        assert got["global_concurrency_limit"]["limit"] == d["concurrency_limit"]["limit"]
        assert got["concurrency_options"]["collision_strategy"] == d["concurrency_limit"]["collision_strategy"]
        assert [(s["schedule"]["cron"], s["active"]) for s in got["schedules"]] == \
            [(s["cron"], s["active"]) for s in d.get("schedules", [])]


def test_a_worker_runs_the_certify_deployment_into_its_store_and_the_report_deployment(server):
    api, env, tmp = server
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp, sigmas=[0.5], methods=[{"kind": "rs"}], shard_size=6)))
    store = tmp / "store"
    run_id = _run_deployment(api, env, "digits-default", config_path=str(config), store=str(store))
    assert _state(api, run_id) == "SCHEDULED"
    _work(env, tmp)
    assert _state(api, run_id) == "COMPLETED"
    # the run landed in the store, in an OUT named after its start and its flow run
    flow_run = httpx.get(f"{api}/flow_runs/{run_id}").json()
    (out,) = [p for p in store.iterdir() if p.is_dir()]
    assert out.name.endswith(flow_run["name"]) and out.name[:8].isdigit()
    certificates = pq.read_table(out / "tables" / "certificates.parquet")
    assert certificates.num_rows == 6
    assert set(certificates.column("method").to_pylist()) == {"rs"}
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["densepure-store-run"]}}})
    assert any(str(out) in (a.get("data") or "") for a in artifacts.json())  # the flow run links its new run
    report = (out / "report.md").read_text()

    # The report deployment rebuilds report.md from the stored tables, and a store's history page.
    (out / "report.md").unlink()
    # The report deployment runs one at a time (prefect.yaml: concurrency_limit, ENQUEUE), so a
    # second run waits for the first; a --run-once worker takes only the first: two passes.
    report_id = _run_deployment(api, env, "report", out=str(out))
    _work(env, tmp)
    history_id = _run_deployment(api, env, "report", out=str(store))
    _work(env, tmp)
    assert _state(api, report_id) == "COMPLETED" and _state(api, history_id) == "COMPLETED"
    assert (out / "report.md").read_text() == report
    assert "1 run(s): 1 complete" in (store / "history.md").read_text()


def test_an_active_cron_schedule_creates_runs(server):
    api, env, _ = server
    deployment = _deployment(api, "digits-default")
    (schedule,) = deployment["schedules"]
    assert not schedule["active"]  # as deployed: prefect.yaml leaves it off until a worker is there
    _cli(["prefect", "deployment", "schedule", "resume", "densepure-certify-file/digits-default", schedule["id"]],
         env)
    query = {"deployments": {"id": {"any_": [deployment["id"]]}},
             "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    deadline, runs = time.monotonic() + 90, []
    while not [r for r in runs if r["auto_scheduled"]] and time.monotonic() < deadline:
        time.sleep(1)  # the server's scheduler runs every 5 s here
        runs = httpx.post(f"{api}/flow_runs/filter", json=query).json()
    auto = [r for r in runs if r["auto_scheduled"]]
    assert auto, "no run was scheduled within 90 s of resuming the schedule"
    starts = sorted(r["expected_start_time"] for r in auto)
    assert all(s.endswith("T03:00:00Z") for s in starts), starts  # cron "0 3 * * *", UTC
    assert len(set(s[:10] for s in starts)) == len(starts)  # one run a night
    assert all(r["parameters"] == deployment["parameters"] for r in auto)
