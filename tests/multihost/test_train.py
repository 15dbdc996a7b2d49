"""`lmforge train`, driven on the head host, on hosts that share nothing but the object
store and the tracking server: data and checkpoints on s3://, one worker per host, the
one-host run's losses; a local path refused at once, naming its field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmforge.pipeline import Summary
from lmforge.tracking import RunTracker

from ..integration.helpers import (
    SPEC,
    file_size,
    lmforge,
    own_cluster_env,
    wait_until,
)
from .harness import Hosts

STALL_S = 180  # a training command prints as it goes: this long silent is a stuck run
# A checkpoint at every evaluation; long enough that a host is taken away well before the
# end (Ray Train passes reports on every 2 s, its default poll, on these clusters).
STEPS = ("train.steps=120", "train.eval_every=20", "train.log_every=1")


def summary_of(out: subprocess.CompletedProcess) -> Summary:
    """The summary `lmforge` printed as its last stdout line."""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Summary(**json.loads(out.stdout.strip().splitlines()[-1]))


def worker_nodes(out: subprocess.CompletedProcess | str) -> set[str]:
    """Node ids of the training workers, from their "[lmforge] rank R/W on node ID" lines
    in a command's output (or a log's text)."""
    text = out if isinstance(out, str) else out.stdout + out.stderr
    return {line.split(" on node ")[1].split()[0] for line in text.splitlines()
            if "[lmforge] rank " in line and " on node " in line}


@pytest.fixture(scope="module")
def one_host_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The reference: the same spec and seed, 2 workers on one machine (this one, its own
    local Ray of 2 CPUs), every path local. In a PID namespace of its own: Ray finds "the"
    local cluster by scanning processes, and would see the hosts' nodes beside its own."""
    tmp = tmp_path_factory.mktemp("one-host")
    out = lmforge("train", str(SPEC), *STEPS, f"data.cache_dir={tmp / 'cache'}",
                  f"train.storage_path={tmp / 'ray'}", f"tracking.uri=sqlite:///{tmp / 'db'}",
                  "registry.enabled=false", cwd=tmp, env=own_cluster_env(), stall_s=STALL_S,
                  prefix=["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--"])
    summary = summary_of(out)
    return dict(RunTracker(summary.tracking_uri, summary.mlflow_run_id)
                .metric_history("train_loss"))


def test_two_hosts_train_from_the_bucket_and_register(two_hosts: Hosts,
                                                      one_host_losses: dict[int, float]):
    hosts = two_hosts
    out = lmforge("train", str(SPEC), *STEPS, f"data.cache_dir={hosts.s3('train/cache')}",
                  f"train.storage_path={hosts.s3('train/ray')}", "tracking.run_name=two-hosts",
                  "registry.model_name=mh-train", prefix=hosts.head.enter(),
                  env=hosts.driver_env(), stall_s=STALL_S)
    summary = summary_of(out)

    # One worker on each host.
    nodes = {n["node_id"]: n["ip"] for n in hosts.alive_nodes()}
    assert {nodes.get(n) for n in worker_nodes(out)} == {h.ip for h in hosts.hosts}, out.stderr

    # The data entry and the checkpoints are in the bucket, nothing of them on a host's disk.
    listing = hosts.list_bucket("train/")
    assert any(key.startswith(f"train/cache/{summary.data_fingerprint}/") for key in listing)
    assert any(key.startswith("train/ray/two-hosts/checkpoint_") for key in listing), listing
    for host in hosts.hosts:
        assert not list(host.checkout.glob("s3:*")) and not (host.runs / "cache").exists()

    # The one-host run's loss at every step.
    run = RunTracker(hosts.mlflow_url, summary.mlflow_run_id)
    losses = dict(run.metric_history("train_loss"))
    assert losses.keys() == one_host_losses.keys() == set(range(1, 121))
    for step, value in losses.items():
        assert value == pytest.approx(one_host_losses[step], abs=1e-5), step

    # Registered in the tracking server every host uses, and promoted (the first version).
    assert summary.registered_model == "mh-train" and summary.registered_version == 1
    version = MlflowClient(hosts.mlflow_url).get_model_version_by_alias("mh-train", "champion")
    assert int(version.version) == summary.registered_version


@pytest.mark.parametrize("field", ["data.cache_dir", "train.storage_path"])
def test_a_local_path_on_several_hosts_fails_at_once_naming_the_field(two_hosts: Hosts,
                                                                       field: str):
    """Every other path in the bucket, `field` on the head's own disk: refused before any
    worker starts, naming the field, and nothing written there."""
    hosts = two_hosts
    local = "/tmp/local-only"
    paths = {"data.cache_dir": hosts.s3("refused/cache"),
             "train.storage_path": hosts.s3("refused/ray"), field: local}
    out = lmforge("train", str(SPEC), *[f"{k}={v}" for k, v in paths.items()],
                  "registry.enabled=false", prefix=hosts.head.enter(),
                  env=hosts.driver_env(), stall_s=STALL_S)
    assert out.returncode != 0, out.stdout[-3000:]
    assert f"{field}={local}" in out.stderr and "2 hosts" in out.stderr, out.stderr[-3000:]
    assert not worker_nodes(out)  # no worker started
    assert not (hosts.head.tmp / "local-only").exists()


def test_losing_a_host_mid_run_resumes_on_the_hosts_left(three_hosts: Hosts,
                                                         one_host_losses: dict[int, float],
                                                         tmp_path: Path):
    """Three hosts, two workers: once a checkpoint is in the bucket, every process of a
    worker's host (not the head's) is killed and its link goes down. Ray Train restarts
    the worker group on the two hosts left, from the latest checkpoint, and the run
    finishes every step with the uninterrupted run's losses."""
    hosts = three_hosts
    node_host = {n["node_id"]: h for n in hosts.alive_nodes()
                 for h in hosts.hosts if h.ip == n["ip"]}
    log = tmp_path / "driver.log"
    driver = hosts.head.popen(
        [sys.executable, "-m", "lmforge", "train", str(SPEC), *STEPS,
         f"data.cache_dir={hosts.s3('loss/cache')}", f"train.storage_path={hosts.s3('loss/ray')}",
         "tracking.run_name=host-loss", "train.max_failures=2", "registry.enabled=false"],
        hosts.driver_env(), log)
    snapshot = "loss/ray/host-loss/checkpoint_manager_snapshot.json"
    moving = lambda: (file_size(log), len(hosts.list_bucket("loss/")))  # noqa: E731

    # Kill once Ray Train has registered a checkpoint (its snapshot lists it) and both
    # workers have said where they run.
    wait_until(lambda: (snapshot in hosts.list_bucket("loss/ray/")
                        and len(worker_nodes(log.read_text())) == 2) or driver.poll() is not None,
               "a checkpoint registered in the bucket", progress=moving, stall_s=STALL_S,
               interval_s=0.2, detail=lambda: log.read_text()[-3000:])
    assert driver.poll() is None, log.read_text()[-3000:]
    first = log.read_text()
    victim = next(node_host[n] for n in sorted(worker_nodes(first))
                  if node_host[n] is not hosts.head)
    victim.kill()
    assert not victim.pids()
    wait_until(lambda: driver.poll() is not None, "the run after the host loss",
               progress=moving, stall_s=STALL_S, interval_s=0.5,
               detail=lambda: log.read_text()[-3000:])

    text = log.read_text()
    assert driver.returncode == 0, text[-5000:]
    summary = Summary(**json.loads(text.strip().splitlines()[-1]))
    assert summary.steps == 120 and summary.attempts == 2, summary
    k = summary.resumed_from_step
    assert k % 20 == 0 and 20 <= k < 120, k
    # The second attempt's workers ran on the hosts left, one on each.
    after = {node_host[n].name for n in worker_nodes(text[len(first):])}
    assert after == {h.name for h in hosts.hosts if h is not victim}, (after, victim.name)
    # Every step after the resume, with the uninterrupted run's loss.
    losses = [(s, v) for s, v in RunTracker(hosts.mlflow_url, summary.mlflow_run_id)
              .metric_history("train_loss") if s > k]
    assert {s for s, _ in losses} == set(range(k + 1, 121))
    for step, value in losses:
        assert value == pytest.approx(one_host_losses[step], abs=1e-5), step
