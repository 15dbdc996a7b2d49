"""`lmforge submit` runs a spec on a cluster started with `ray start --head` (token auth on),
and `status`/`logs` follow it to SUCCEEDED."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def lmforge(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A `ray start --head --block` cluster with token auth on and its own HOME, so its own
    token in HOME/.ray/auth_token; clients get an env without RAY_AUTH_MODE, like a user's."""
    tmp_path = tmp_path_factory.mktemp("head")
    env = dict(os.environ, HOME=str(tmp_path / "home"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True)
    dashboard = free_port()
    # Its own temp dir, so it does not take over /tmp/ray/ray_current_cluster, which the
    # session cluster's Ray Train placement-group cleaner reads to find its State API.
    # (Short path: Ray's unix sockets live under it.)
    temp_dir = tempfile.mkdtemp(prefix="lmf-", dir="/tmp")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--temp-dir={temp_dir}",
         f"--port={free_port()}", f"--dashboard-port={dashboard}", "--num-cpus=2",
         # Ports other than Ray's defaults, which the session's own cluster already holds.
         f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
        env=dict(env, RAY_AUTH_MODE="token"), stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "ray-start.log").open("w"))
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, env, head, tmp_path / "ray-start.log")
        yield address, env
    finally:
        head.terminate()  # --block: the head tears its whole cluster down on SIGTERM
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict[str, str], head: subprocess.Popen,
                       log: Path) -> None:
    """Poll the Jobs API itself (with the token) until it answers; bounded, not a sleep."""
    probe = ("import sys; from lmforge.jobs import client; "
             "client(sys.argv[1]).list_jobs()")
    for _ in range(120):
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}: "
                               f"{log.read_text()[-3000:]}")
        if subprocess.run([sys.executable, "-c", probe, address], env=env,
                          capture_output=True).returncode == 0:
            return
    raise TimeoutError(f"Jobs API at {address} never answered")


def test_submit_runs_spec_to_success(head_node, tmp_path: Path):
    address, env = head_node
    env = dict(env)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = "tests/integration/specs/tiny.yaml"
    # With API keys on, the run's own serve check must authenticate too.
    submitted = lmforge("submit", spec, f"serve.port={free_port()}", "train.steps=40",
                        "serve.api_keys=[job-key]",
                        f"data.cache_dir={tmp_path / 'cache'}", "--address", address, "--wait",
                        env=env, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job_id = submitted.stdout.splitlines()[0]
    assert job_id.startswith("lmforge-")

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
    r = lmforge("status", "nope", "--address", address, env=env, timeout=60)
    assert r.returncode != 0
    assert "401" in r.stderr or "nauthorized" in r.stderr or "uthentication" in r.stderr
