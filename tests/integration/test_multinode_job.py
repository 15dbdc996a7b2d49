"""A 2-node local cluster (`lmforge cluster up`: two `ray start` raylets, 1 CPU each, token
auth on) runs a 2-worker training job submitted through the Jobs API: one worker per node,
the job SUCCEEDS and registers its model; `stop` ends a job and leaves no worker behind;
`lmforge cluster down` stops every process the cluster started."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from lmforge.cluster import LocalCluster, group_members

from .helpers import ROOT, SPEC, lmforge, tree_size, user_env, wait_until

SPEC_ARG = str(SPEC.relative_to(ROOT))  # as a user in the project root types it


# Ray's State API from a fresh process with the cluster's token (Ray caches tokens
# process-wide, and this pytest process may hold the session cluster's).
_TRAIN_WORKERS = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors
address, submission_id = sys.argv[1], sys.argv[2]
job_id = JobSubmissionClient(address).get_job_info(submission_id).job_id
if job_id is None:  # the driver has not started yet
    print("[]")
    sys.exit()
actors = list_actors(address=address, filters=[("job_id", "=", job_id)], detail=True)
print(json.dumps([{"cls": a.class_name, "node": a.node_id, "pid": a.pid, "state": a.state}
                  for a in actors if "TrainWorker" in a.class_name]))
"""


def train_workers(address: str, env: dict[str, str], job_id: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", _TRAIN_WORKERS, address, job_id],
                       env=dict(env, RAY_AUTH_MODE="token"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.long  # a 2-node cluster, jobs on it, a stop: minutes (`make test-long`)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """`lmforge cluster up --nodes 2 --cpus-per-node 1` as a user with their own HOME (so
    their own ~/.ray/auth_token); `lmforge cluster down` afterwards must stop every node."""
    tmp = tmp_path_factory.mktemp("multinode")
    env = user_env(tmp / "home")
    root = tmp / "cluster"
    up = lmforge("cluster", "up", "--nodes", "2", "--cpus-per-node", "1", "--root", str(root),
                 env=env, timeout_s=600)
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        info = json.loads(up.stdout.strip().splitlines()[-1])
        yield info["dashboard_url"], env
    finally:
        started = LocalCluster.load(root) if (root / "state.json").exists() else None
        down = lmforge("cluster", "down", "--root", str(root), env=env, timeout_s=300)
        if started is not None:
            assert down.returncode == 0, down.stderr[-3000:]
            assert not started.running()
            assert group_members(started.pids) == [], "processes left in the cluster's groups"


def test_cluster_status_shows_two_alive_nodes(cluster):
    address, env = cluster
    status = lmforge("cluster", "status", "--root", str(Path(env["HOME"]).parent / "cluster"),
                     env=env, timeout_s=300)
    assert status.returncode == 0, status.stderr[-3000:]
    out = json.loads(status.stdout)
    assert out["dashboard_url"] == address
    assert len(out["alive"]) == 2 and sorted(n["head"] for n in out["alive"]) == [False, True]
    assert all(n["cpus"] == 1 for n in out["alive"])


def test_two_worker_job_spans_both_nodes_and_registers(cluster, tmp_path: Path):
    address, env = cluster
    env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # 0.9 CPU per worker on 1-CPU nodes: the two workers cannot share a node.
    submitted = lmforge("submit", SPEC_ARG, "train.steps=20", "train.eval_every=10",
                        "serve.enabled=false", f"data.cache_dir={tmp_path / 'cache'}",
                        f"train.storage_path={tmp_path / 'ray'}", "--address", address,
                        "--wait", env=env, stall_s=300)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job_id = submitted.stdout.splitlines()[0]
    assert lmforge("status", job_id, "--address", address, env=env).stdout.strip() == "SUCCEEDED"

    workers = train_workers(address, env, job_id)
    assert len(workers) == 2, workers
    assert len({w["node"] for w in workers}) == 2, f"workers share a node: {workers}"

    summary = json.loads(lmforge("logs", job_id, "--address", address,
                                 env=env).stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["registered_version"] >= 1
    version = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(
        "lmforge-tiny", "champion")
    assert int(version.version) == summary["registered_version"]


def test_stop_ends_the_job_and_its_workers(cluster, tmp_path: Path):
    address, env = cluster
    env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    submitted = lmforge("submit", SPEC_ARG, "train.steps=100000", "train.eval_every=100000",
                        "serve.enabled=false", "registry.enabled=false",
                        f"data.cache_dir={tmp_path / 'cache'}",
                        f"train.storage_path={tmp_path / 'ray'}", "--address", address, env=env)
    assert submitted.returncode == 0, submitted.stderr[-4000:]
    job_id = submitted.stdout.splitlines()[0]

    def both_workers_alive() -> list[dict]:
        assert lmforge("status", job_id, "--address", address,
                       env=env).stdout.strip() in ("PENDING", "RUNNING")
        alive = [w for w in train_workers(address, env, job_id) if w["state"] == "ALIVE"]
        return alive if len(alive) == 2 else []

    # Each poll runs two fresh processes (a few seconds of CPU on a 2-core machine), so
    # poll at a modest rate: a tight loop would slow the job it waits for. The job is still
    # starting while its cluster writes logs (a process each for driver and workers).
    temp_dirs = LocalCluster.load(Path(env["HOME"]).parent / "cluster").temp_dirs
    alive = wait_until(both_workers_alive, "both training workers running", interval_s=1,
                       progress=lambda: [tree_size(Path(d)) for d in temp_dirs],
                       detail=lambda: lmforge("logs", job_id, "--address", address,
                                              env=env).stdout[-4000:])

    stopped = lmforge("stop", job_id, "--address", address, env=env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped", stopped.stderr
    wait_until(lambda: lmforge("status", job_id, "--address", address,
                               env=env).stdout.strip() == "STOPPED", "job STOPPED",
               timeout_s=60, interval_s=1)
    left = lambda: [w["pid"] for w in alive if psutil.pid_exists(w["pid"])]  # noqa: E731
    wait_until(lambda: not left(), "training workers exited", timeout_s=60, interval_s=0.5,
               detail=lambda: f"still running: {left()}")
