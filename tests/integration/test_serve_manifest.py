"""The app the KubeRay RayService manifest deploys asks for an API key.

The manifest's serveConfigV2 names an `import_path` and `args`; Ray Serve builds the app by
importing that builder and calling it with the args, with the pod's environment, which
carries LMFORGE_API_KEYS from a Kubernetes secret. Here the same builder is called the way
Serve's controller calls it, and the app answers over real HTTP.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml
from ray import serve
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from lmforge.config import ServeConfig
from lmforge.serve import deploy

from .helpers import free_port
from .test_cli_serve import save_tiny_model

MANIFEST = Path(__file__).resolve().parents[2] / "cluster" / "kuberay" / "rayservice.yaml"


def test_rayservice_app_refuses_requests_without_the_secret_key(ray_cluster, tmp_path: Path,
                                                                monkeypatch):
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (app,) = ServeDeploySchema.model_validate(
        yaml.safe_load(doc["spec"]["serveConfigV2"])).applications
    env = {e["name"]: e for e in doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
           ["spec"]["containers"][0]["env"]}
    assert env["LMFORGE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "lmforge-secrets"
    monkeypatch.setenv("LMFORGE_API_KEYS", "k8s-key-1,k8s-key-2")  # as the secret sets it

    save_tiny_model(tmp_path / "model")  # no registry here: the builder loads a directory
    args = dict(app.args, model_uri=str(tmp_path / "model"),
                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), args)
    port = free_port()
    url = deploy(built, ServeConfig(port=port))
    try:
        body = {"prompt": "to be", "max_tokens": 2, "temperature": 0}
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.post("/v1/completions", json=body).status_code == 401
            wrong = http.post("/v1/completions", json=body,
                              headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            for key in ("k8s-key-1", "k8s-key-2"):
                ok = http.post("/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200, ok.text
    finally:
        serve.shutdown()
