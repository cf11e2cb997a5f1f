"""Importing a module sets no environment variable; the entry points set the defaults, before
torch or Prefect read them (flows/environment.py, flows/cli.py, tasks/common/faults.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.environment import ENVIRONMENT_DEFAULTS, apply_environment_defaults

ROOT = Path(__file__).resolve().parents[2]
WATCHED = [*ENVIRONMENT_DEFAULTS, "DENSEPURE_FAULT_PGID"]


def python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in WATCHED}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("module", ["flows.cli", "flows.certify", "flows.attack", "flows.report", "flows.environment",
                                    "tasks.common.faults", "tasks.certify.vote", "densepure_core.config"])
def test_importing_changes_no_environment_variable(module):
    run = python(f"import os; before = dict(os.environ); import {module}; "
                 f"print(sorted(set(os.environ.items()) ^ set(before.items())))",
                 DENSEPURE_FAULT="vote:mid-shard")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", run.stdout


def test_the_cli_entry_sets_the_defaults_and_explicit_settings_win():
    code = ("import os, json; from flows.cli import app; app(['config', 'show'], standalone_mode=False); "
            f"print(json.dumps({{k: os.environ.get(k) for k in {WATCHED!r}}}))")
    run = python(code, PREFECT_LOGGING_LEVEL="DEBUG", DENSEPURE_FAULT="vote:mid-shard")
    assert run.returncode == 0, run.stderr[-3000:]
    env = json.loads(run.stdout.strip().splitlines()[-1])
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_LOGGING_LEVEL"] == "DEBUG"  # the environment wins
    assert env["DENSEPURE_FAULT_PGID"].isdigit()  # the driver's group, recorded by the entry point


def test_a_cli_certify_applies_the_defaults_before_prefect_and_torch_are_imported():
    """An import hook stops the process at the first import of prefect (and notes torch's):
    the settings they read at import must already be in the environment."""
    code = '''
import importlib.abc, json, os, sys
seen = {}
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "prefect") and name not in seen:
            seen[name] = {k: os.environ.get(k) for k in %r}
            if name == "prefect":
                print(json.dumps(seen), flush=True)
                os._exit(0)
        return None
sys.meta_path.insert(0, Hook())
from flows.cli import app
app(["certify", "--out", sys.argv[1] if len(sys.argv) > 1 else "/nonexistent/out"])
''' % (list(ENVIRONMENT_DEFAULTS),)
    run = python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(seen) >= {"prefect"}
    for name, env in seen.items():
        assert env == ENVIRONMENT_DEFAULTS, name


def test_apply_environment_defaults_returns_what_it_set(monkeypatch):
    for key in ENVIRONMENT_DEFAULTS:
        monkeypatch.setenv(key, "explicit")
    assert apply_environment_defaults() == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert apply_environment_defaults() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert os.environ["PREFECT_LOGGING_LEVEL"] == "explicit"


def test_the_fault_driver_record_is_explicit(monkeypatch):
    from tasks.common import faults

    monkeypatch.delenv("DENSEPURE_FAULT_PGID", raising=False)
    monkeypatch.delenv("DENSEPURE_FAULT", raising=False)
    faults.record_driver_process_group()
    assert "DENSEPURE_FAULT_PGID" not in os.environ  # only when a fault is armed
    monkeypatch.setenv("DENSEPURE_FAULT", "vote:mid-shard")
    try:
        faults.record_driver_process_group()
        assert os.environ["DENSEPURE_FAULT_PGID"] == str(os.getpgid(0))
    finally:
        # Never leak it: a later fault test's child would inherit pytest's own process group
        # as the "driver" and kill the test run (monkeypatch cannot undo a variable it did not set).
        os.environ.pop("DENSEPURE_FAULT_PGID", None)


def test_every_prefect_deployment_names_a_flow_and_a_config_it_can_load():
    """prefect.yaml's entrypoints import to Prefect flows, and each config_path loads with the
    config type of its flow (certify: CertifyConfig; attack: AttackConfig; train-addt: AddtConfig),
    with the deployment's overrides."""
    import importlib

    import yaml
    from prefect import Flow

    from densepure_core.config.addt import AddtConfig
    from densepure_core.config.attack import AttackConfig
    from densepure_core.config import load_config

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["entrypoint"] for d in deployments} == {"flows/certify.py:certify_config_file",
                                                      "flows/attack.py:attack_config_file",
                                                      "flows/train_addt.py:train_addt_config_file",
                                                      "flows/report.py:report_flow"}
    for d in deployments:
        path, name = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        assert isinstance(flow, Flow)
        if name == "report_flow":  # no config: it rebuilds the report of an OUT
            assert set(d["parameters"]) == {"out"}
            continue
        model = AddtConfig if "addt" in name else AttackConfig if "attack" in name else None
        assert load_config(d["parameters"]["config_path"], d["parameters"].get("overrides", []), model=model).run_name
