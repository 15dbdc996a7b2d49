"""Every file under cluster/ validates: launcher configs against Ray's own cluster schema
(ray/autoscaler/ray-schema.json, through Ray's validate_config), the RayService's Serve
config against Ray Serve's ServeDeploySchema, the RayJob's entrypoint spec with
lmforge.config.load, the MLflow server's command lines with the installed `mlflow server`
command. KubeRay's CRD schemas ship in no PyPI or npm package, so the manifests are checked
for what lmforge relies on (see cluster/README.md), not against CRDs."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import ray
import yaml

from lmforge import jobs

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted((CLUSTER / "launcher").glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
MLFLOW = CLUSTER / "mlflow"


def test_every_cluster_yaml_is_covered():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    mlflow_files = [MLFLOW / "kubernetes.yaml", MLFLOW / "docker-compose.yaml"]
    assert not [p for p in CLUSTER.rglob("*.y*ml") if p not in LAUNCHER + KUBERAY + mlflow_files]


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


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_runs_this_ray_with_token_auth_and_gpu_workers(path: Path):
    (doc,) = _docs(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert "KubeRay v1.5.0" in path.read_text().split("apiVersion")[0]
    cluster = _cluster_spec(doc)
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
    assert args[-1] == "--resume-if-started"  # applied again after a failure, it resumes
    spec = load(ROOT / args[4], args[5:-1])
    assert spec.train.storage_path.startswith("s3://")  # shared by every node
    assert spec.data.cache_dir.startswith("s3://")  # every worker reads the data
    assert spec.tracking.run_name  # a fixed name, so a resubmission resumes it


def test_rayservice_serve_config_passes_serve_schema_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from lmforge.serve import serve_app

    (doc,) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "lmforge.serve:serve_app"
    assert app.args["model_uri"].endswith("@champion")
    built = serve_app(app.args)  # the builder KubeRay's Serve controller will call
    (dep,) = app.deployments
    assert dep.name == built._bound_deployment.name
    assert dep.autoscaling_config["max_replicas"] > dep.autoscaling_config["min_replicas"]


def test_the_old_import_path_still_builds_the_same_app_with_a_warning():
    import lmforge.cluster
    from lmforge.serve import serve_app

    with pytest.warns(DeprecationWarning, match="moved to lmforge.serve:serve_app"):
        assert lmforge.cluster.serve_app is serve_app


def _mlflow_server_params(argv: list[str], env: dict[str, str]) -> dict:
    """argv (`mlflow server ...`) and the container's variables, parsed by the installed
    MLflow's own command without starting it: an unknown flag or MLFLOW_* variable fails."""
    import mlflow.environment_variables
    from mlflow.cli import server

    assert argv[:2] == ["mlflow", "server"]
    by_envvar = {p.envvar: p.name for p in server.params if p.envvar}
    for name in env:
        assert name in by_envvar or hasattr(mlflow.environment_variables, name) or \
            name in jobs.FORWARDED_ENV, f"{name}: not an MLflow variable"
    params = server.make_context("server", argv[2:]).params
    return params | {by_envvar[k]: v for k, v in env.items() if k in by_envvar}


def test_mlflow_image_is_the_installed_mlflow_with_postgres_and_s3_drivers():
    import mlflow

    dockerfile = (MLFLOW / "Dockerfile").read_text()
    assert f"FROM ghcr.io/mlflow/mlflow:v{mlflow.__version__}\n" in dockerfile
    assert "psycopg2" in dockerfile and "boto3" in dockerfile
    pod = _docs(MLFLOW / "kubernetes.yaml")[0]["spec"]["template"]["spec"]
    compose = yaml.safe_load((MLFLOW / "docker-compose.yaml").read_text())["services"]
    for image in (pod["containers"][0]["image"], compose["mlflow"]["image"]):
        assert image.endswith(f"lmforge-mlflow:{mlflow.__version__}")


def test_mlflow_on_kubernetes_serves_the_uri_the_ray_pods_use():
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    deployment, service = _docs(MLFLOW / "kubernetes.yaml")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    params = _mlflow_server_params(c["command"] + c["args"], {k: "set" for k in env})
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]  # no password here
    assert params["serve_artifacts"] and params["artifacts_destination"].startswith("s3://")
    # Every Ray pod's MLFLOW_TRACKING_URI names this Service, and passes MLflow's host check.
    (uri,) = {e["value"] for p in KUBERAY for pod in _pod_specs(_cluster_spec(_docs(p)[0]))
              for ctr in pod["containers"] for e in ctr["env"]
              if e["name"] == "MLFLOW_TRACKING_URI"}
    url = urlsplit(uri)
    meta = service["metadata"]
    assert url.hostname == f"{meta['name']}.{meta['namespace']}.svc"
    assert meta["namespace"] == deployment["metadata"]["namespace"]
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port] == [params["port"]]
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    allowed = params["allowed_hosts"].split(",")
    assert is_allowed_host_header(allowed, url.netloc)
    assert is_allowed_host_header(allowed, f"{url.hostname}.cluster.local:{url.port}")
    assert not is_allowed_host_header(allowed, f"{meta['name']}.attacker.example:{url.port}")


def test_mlflow_on_a_vm_keeps_its_secrets_in_the_environment():
    mlflow_service = yaml.safe_load(
        (MLFLOW / "docker-compose.yaml").read_text())["services"]["mlflow"]
    env = dict(e.partition("=")[::2] for e in mlflow_service["environment"])
    params = _mlflow_server_params(mlflow_service["command"], env)
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://mlflow:${POSTGRES_PASSWORD")
    assert "@postgres:5432/" in backend and "postgres" in mlflow_service["depends_on"]
    assert params["serve_artifacts"]
    assert params["artifacts_destination"].startswith("${MLFLOW_ARTIFACTS_DESTINATION:?")
    # Credentials pass through from the shell that starts it, never written in the file.
    assert not [v for k, v in env.items() if k.startswith("AWS_") and v]


def test_jobs_find_the_server_through_mlflow_tracking_uri(monkeypatch):
    from lmforge.config import TrackingConfig, resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lmforge.svc:5000")
    uri = resolve_tracking_uri(TrackingConfig(), Path("runs"))
    assert jobs.job_env(uri, {})["MLFLOW_TRACKING_URI"] == "http://mlflow.lmforge.svc:5000"
    for f in ("kubernetes.yaml", "docker-compose.yaml", "README.md"):
        assert "MLFLOW_TRACKING_URI" in (MLFLOW / f).read_text(), f  # the name lmforge reads


# --- the cluster image (cluster/Dockerfile) ---------------------------------------------
# No container builder runs on the machines this suite runs on (no Docker daemon, no
# registry access), so the image is checked for what can be checked without building it.

IMAGE = "ghcr.io/YOUR_ORG/lmforge"


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dockerfile_args() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    before_from = text.split("\nFROM ", 1)[0]
    return dict(line.removeprefix("ARG ").split("=", 1) for line in before_from.splitlines()
                if line.startswith("ARG ") and "=" in line)


def test_image_is_rays_image_of_the_pinned_ray_and_python():
    import sys

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    args = _dockerfile_args()
    pinned = next(Requirement(r) for r in _project()["dependencies"] if r.startswith("ray["))
    assert args["RAY_VERSION"] == ray.__version__ and args["RAY_VERSION"] in pinned.specifier
    assert args["PYTHON"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    python = f"{args['PYTHON'][2]}.{args['PYTHON'][3:]}"
    assert python in SpecifierSet(_project()["requires-python"])
    text = (CLUSTER / "Dockerfile").read_text()
    assert "\nFROM rayproject/ray:${RAY_VERSION}-${PYTHON}${VARIANT}\n" in text
    assert args["VARIANT"] == ""  # the CPU image unless --build-arg VARIANT=-gpu
    # lmforge under the same constraints as `make install`, and Ray pinned to the image's.
    install = text.split("pip install", 1)[1].split("&& \\\n    python -c", 1)[0]
    assert "-c constraints.txt" in install and '"ray[train,tune,serve]==${RAY_VERSION}" .' \
        in install


def test_image_build_context_holds_what_the_dockerfile_copies():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    text = (CLUSTER / "Dockerfile").read_text()
    copied = [src for line in text.splitlines() if line.startswith("COPY ")
              for src in line.split()[1:-1] if not src.startswith("--")]
    assert copied and set(copied) <= allowed, (copied, allowed)
    assert all((ROOT / src).exists() for src in copied)
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()  # nothing else ships


def test_manifests_and_docs_name_the_image_that_is_built():
    """Every KubeRay container runs IMAGE:VERSION (the CPU build) or IMAGE:VERSION-gpu (when
    it asks for GPUs), and the build commands in the Dockerfile, cluster/README.md and
    docs/clusters.md tag exactly those."""
    import re

    version = _project()["version"]
    for path in KUBERAY:
        (doc,) = _docs(path)
        for pod in _pod_specs(_cluster_spec(doc)):
            for c in pod["containers"]:
                gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                assert c["image"] == f"{IMAGE}:{version}{'-gpu' if gpu else ''}", path.name
    for doc in (CLUSTER / "Dockerfile", CLUSTER / "README.md", ROOT / "docs" / "clusters.md"):
        builds = re.findall(r"docker build -f cluster/Dockerfile (.*?)-t (\S+) \.",
                            doc.read_text())
        assert {(a.strip(), t) for a, t in builds} == {
            ("", f"{IMAGE}:{version}"), ("--build-arg VARIANT=-gpu", f"{IMAGE}:{version}-gpu")
        }, doc
