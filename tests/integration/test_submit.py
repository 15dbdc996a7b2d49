"""`lmforge submit` runs a spec on a cluster started with `ray start --head` (token auth on),
and `status`/`logs` follow it to SUCCEEDED; the secret the job needs (its API key) comes
from the nodes' environment at `ray start`, never with the job."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmforge.cluster import LocalCluster

from .helpers import BIN, free_port, lmforge, user_env

JOB_KEY = "job-key-7f3a"


@pytest.fixture(scope="module")
def head_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A `ray start --head --block` cluster (`LocalCluster`: free ports, its own temp dir,
    token auth on) with its own HOME, so its own token in HOME/.ray/auth_token; clients get
    an env without RAY_AUTH_MODE, like a user's."""
    tmp_path = tmp_path_factory.mktemp("head")
    home = tmp_path / "home"
    # How a cluster's nodes get secrets (docs/clusters.md#secrets): in the environment of
    # `ray start`, which every worker and job driver on the node inherits.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_API_KEYS", JOB_KEY)
        cluster = LocalCluster.up(nodes=1, cpus_per_node=2, root=tmp_path / "cluster",
                                  home=home)
    with cluster:
        yield cluster.dashboard_url, user_env(home)


@pytest.mark.e2e_fast  # the one end-to-end test `make test-fast` runs: data to serving
def test_submit_runs_spec_to_success(head_node, tmp_path: Path):
    address, env = head_node
    env = dict(env)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["LMFORGE_API_KEYS"] = JOB_KEY  # set here too: submit must not send it
    spec = "tests/integration/specs/tiny.yaml"
    # With API keys on (the nodes' LMFORGE_API_KEYS), the run's own serve check must
    # authenticate too.
    submitted = lmforge("submit", spec, f"serve.port={free_port()}", "train.steps=40",
                        f"data.cache_dir={tmp_path / 'cache'}", "--address", address, "--wait",
                        env=env, stall_s=300)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job_id = submitted.stdout.splitlines()[0]
    assert job_id.startswith("lmforge-")
    assert "Not sent with the job (secrets): LMFORGE_API_KEYS" in " ".join(
        submitted.stderr.split())
    # What Ray hands anyone who can list jobs holds no key.
    info = subprocess.run(
        [str(BIN / "python"), "-c", "import sys; from lmforge import jobs; "
         "print(jobs.client(sys.argv[1]).get_job_info(sys.argv[2]).json())", address, job_id],
        env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert job_id in info and JOB_KEY not in info
    assert "LMFORGE_API_KEYS" not in json.loads(info)["runtime_env"].get("env_vars", {})

    assert lmforge("status", job_id, "--address", address, env=env).stdout.strip() == "SUCCEEDED"
    logs = lmforge("logs", job_id, "--address", address, env=env).stdout
    summary = json.loads(logs.strip().splitlines()[-1])
    assert summary["steps"] == 40 and summary["registered_version"] >= 1
    assert summary["completion"]["text"] is not None
    version = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(
        "lmforge-tiny", "champion")
    assert int(version.version) == summary["registered_version"]


def test_jobs_api_without_token_is_refused(head_node):
    """The cluster keeps Ray's token auth on: a client that sends no token gets 401."""
    address, env = head_node
    env = dict(env, RAY_AUTH_MODE="disabled")
    r = lmforge("status", "nope", "--address", address, env=env, timeout_s=120)
    assert r.returncode != 0
    assert "401" in r.stderr or "nauthorized" in r.stderr or "uthentication" in r.stderr
