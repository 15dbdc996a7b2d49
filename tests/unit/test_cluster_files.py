"""Every file under cluster/ validates: launcher configs against Ray's own cluster schema
(ray/autoscaler/ray-schema.json, through Ray's validate_config), the RayService's Serve
config against Ray Serve's ServeDeploySchema, the RayJob's entrypoint spec with
lmforge.config.load. KubeRay's CRD schemas ship in no PyPI or npm package, so the
manifests are checked for what lmforge relies on (see cluster/README.md), not against CRDs."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted((CLUSTER / "launcher").glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def test_every_cluster_yaml_is_covered():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    assert not [p for p in CLUSTER.rglob("*.y*ml") if p not in LAUNCHER + KUBERAY]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path: Path):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)  # jsonschema against ray-schema.json, plus Ray's own checks
    types = config["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["resources"]["GPU"] == 8 and t["max_workers"] >= 1 for t in gpu)
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("pip install" in c and "~/lmforge" in c for c in config["setup_commands"])


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_runs_this_ray_with_token_auth_and_gpu_workers(path: Path):
    (doc,) = _docs(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert "KubeRay v1.5.0" in path.read_text().split("apiVersion")[0]
    spec = doc["spec"]
    cluster = {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
               "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](spec)
    assert cluster["rayVersion"] == ray.__version__
    for pod in _pod_specs(cluster):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert "MLFLOW_TRACKING_URI" in env
    workers = [g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in cluster["workerGroupSpecs"]]
    assert all(int(w["nvidia.com/gpu"]) >= 1 for w in workers)
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayjob_entrypoint_is_a_valid_lmforge_spec():
    from lmforge.config import load

    (doc,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    args = shlex.split(doc["spec"]["entrypoint"])
    assert args[:4] == ["python", "-m", "lmforge", "run"]
    spec = load(ROOT / args[4], args[5:])
    assert spec.train.storage_path.startswith("s3://")  # shared by every node
    assert spec.tracking.run_name  # a fixed name, so a resubmission resumes it


def test_rayservice_serve_config_passes_serve_schema_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from lmforge.cluster import serve_app

    (doc,) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "lmforge.cluster:serve_app"
    assert app.args["model_uri"].endswith("@champion")
    built = serve_app(app.args)  # the builder KubeRay's Serve controller will call
    (dep,) = app.deployments
    assert dep.name == built._bound_deployment.name
    assert dep.autoscaling_config["max_replicas"] > dep.autoscaling_config["min_replicas"]
