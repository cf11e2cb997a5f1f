"""infra/: the KubeRay manifests, the `ray up` cluster config, the Dockerfile and the Prefect work
pool hold together with the project (no cluster, registry or Docker daemon needed).

What is checked here is what can be checked offline: the `ray up` file against Ray's own
cluster-config schema (as `ray up` does), the RayJob's config against the project's config
model and the preset it claims to be, the pool template against Prefect's default one, and the
cross-references between the files (images, versions, mounts, names, paths).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
IMAGE = "REGISTRY/densepure:TAG"


def _locked(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)$", (ROOT / "requirements/lock.txt").read_text(), re.M)
    assert match, f"{name} is not pinned in requirements/lock.txt"
    return match.group(1)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (doc,) = _docs(INFRA / "k8s/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    return doc


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_raycluster_has_a_cpu_head_and_autoscaling_gpu_worker_groups(raycluster):
    spec = raycluster["spec"]
    assert spec["rayVersion"] == _locked("ray")  # the Ray inside the image
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no actors on the head: it runs the drivers
    for c in _containers(head["template"]):
        assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {}))
    groups = spec["workerGroupSpecs"]
    assert len(groups) >= 1
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        (worker,) = _containers(g["template"])
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one actor per GPU
    # With no GPU anywhere a run would size its pool for CPU actors (docs/deploy.md): some group keeps one.
    assert any(g["minReplicas"] >= 1 for g in groups)
    images = {c["image"] for c in _containers(head["template"])}
    images |= {c["image"] for g in groups for c in _containers(g["template"])}
    assert images == {IMAGE}


def test_the_prefect_worker_beside_the_head_shares_the_ray_session_dir(raycluster):
    head = {c["name"]: c for c in _containers(raycluster["spec"]["headGroupSpec"]["template"])}
    worker = head["prefect-worker"]
    assert worker["command"] == ["infra/prefect/start-worker.sh"]
    # The checkout inside the image, where prefect.yaml's pull step goes ($DENSEPURE_HOME).
    assert worker["workingDir"] == "/opt/densepure"
    assert "DENSEPURE_HOME=/opt/densepure" in (INFRA / "docker/Dockerfile").read_text()
    mounts = {c: {m["mountPath"]: m["name"] for m in head[c]["volumeMounts"]} for c in head}
    assert mounts["prefect-worker"]["/tmp/ray"] == mounts["ray-head"]["/tmp/ray"]  # ray_address "auto"


def test_rayjob_runs_densepure_certify_on_the_cluster_from_the_mounted_config(raycluster):
    from densepure_core.config import CertifyConfig, load_config

    docs = {d["kind"]: d for d in _docs(INFRA / "k8s/rayjob.yaml")}
    job, configmap = docs["RayJob"], docs["ConfigMap"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == raycluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["densepure", "certify"] and "--ray-address" in argv
    config_path = Path(argv[argv.index("--config") + 1])

    # The config file is a key of the ConfigMap, mounted where the entrypoint reads it (the head).
    head = _containers(raycluster["spec"]["headGroupSpec"]["template"])[0]
    volumes = {v["name"]: v for v in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in head["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    text = configmap["data"][config_path.name]

    cfg = CertifyConfig.model_validate(yaml.safe_load(text))
    assert all(s.startswith("s3://") for s in (cfg.out, cfg.dataset.path, cfg.diffusion.source))
    # It certifies exactly what the preset it copies does (same votes, same certificates).
    preset = load_config("imagenet_densepure", [f"diffusion.source={cfg.diffusion.source}",
                                                f"dataset.path={cfg.dataset.path}"])
    assert cfg.config_hash() == preset.config_hash()


def test_ray_up_config_is_valid_for_ray_and_matches_the_kuberay_cluster():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    config = prepare_config(raw)  # what `ray up` does: defaults of the provider, then the schema
    validate_config(config)
    assert config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t.get("min_workers", 0) >= 1 for name, t in types.items() if name != config["head_node_type"])
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])


def test_dockerfile_installs_the_lock_through_setup_and_bakes_no_weights():
    text = (INFRA / "docker/Dockerfile").read_text()
    sources = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line]
    assert "requirements/lock.txt" in sources
    assert all((ROOT / s).exists() for s in sources if s != "."), sources
    assert "-r requirements/lock.txt" in text and "bash infra/setup.sh" in text  # the same install as make setup
    assert "torch.version.cuda" in text  # the build fails if a CPU torch got in
    ignored = (INFRA / "docker/Dockerfile.dockerignore").read_text().split()
    for pattern in (".venv", "results", "models", "**/*.pt", "**/*.ckpt", "**/*.bin"):
        assert pattern in ignored, pattern
    # The .pth that setup.sh installs must survive the **/*.pth rule.
    assert "!infra/densepure_tvfix.pth" in ignored
    assert "infra/densepure_tvfix.pth" in (ROOT / "infra/setup.sh").read_text()


def test_the_work_pool_template_is_prefects_process_template_with_the_entry_point_environment():
    from prefect.workers.process import ProcessWorker

    from flows.environment import ENVIRONMENT_DEFAULTS

    ours = json.loads((INFRA / "prefect/work-pool.json").read_text())
    default = ProcessWorker.get_default_base_job_template()
    assert ours["job_configuration"] == default["job_configuration"]
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"])
    env = ours["variables"]["properties"]["env"]["default"]
    assert env["OMP_WAIT_POLICY"] == ENVIRONMENT_DEFAULTS["OMP_WAIT_POLICY"]


@pytest.mark.parametrize("doc", ["docs/deploy.md", "docs/scale.md"])
def test_the_docs_name_only_files_that_exist(doc):
    text = (ROOT / doc).read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:infra|docs|flows|tasks|tests|densepure_core)/[\w./-]+"
                           r"\.(?:ya?ml|json|sh|md|py)|infra/docker/Dockerfile|prefect\.yaml)\b", text))
    assert paths, f"{doc} names no file"
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
