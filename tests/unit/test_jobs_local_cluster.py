"""lmforge.cluster without starting Ray: argument checks, the state file, stale clusters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cluster import STATE_FILE, ClusterError, LocalCluster


def test_load_without_state_names_the_file_and_the_fix(tmp_path: Path):
    with pytest.raises(ClusterError, match=r"state\.json.*lmforge cluster up"):
        LocalCluster.load(tmp_path)


@pytest.mark.parametrize("kwargs, field", [({"nodes": 0}, "nodes"),
                                           ({"cpus_per_node": 0}, "cpus_per_node")])
def test_up_rejects_bad_sizes(tmp_path: Path, kwargs: dict, field: str):
    with pytest.raises(ValueError, match=field):
        LocalCluster.up(root=tmp_path, **kwargs)
    assert not (tmp_path / STATE_FILE).exists()


def test_state_round_trips_and_down_stops_only_its_own_processes(tmp_path: Path):
    """down() signals the recorded processes (standing in for `ray start --block`), removes
    their temp dirs and the state file, and leaves an unrelated process alone."""
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
    temp = tmp_path / "node-temp"
    temp.mkdir()
    try:
        c = LocalCluster(root=tmp_path, address="127.0.0.1:1", dashboard_url="http://x:2",
                         env={"RAY_AUTH_MODE": "token"}, pids=[mine.pid],
                         temp_dirs=[str(temp)])
        c._save()
        loaded = LocalCluster.load(tmp_path)
        assert loaded == c and loaded.running() and loaded.nodes == 1
        loaded.down()
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None
        assert not temp.exists() and not (tmp_path / STATE_FILE).exists()
        assert not loaded.running()
    finally:
        other.kill()
        other.wait()
        mine.kill()
        mine.wait()


def test_up_over_a_running_cluster_is_refused(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        LocalCluster(root=tmp_path.resolve(), address="127.0.0.1:1",
                     dashboard_url="http://127.0.0.1:2", env={}, pids=[proc.pid])._save()
        with pytest.raises(ClusterError, match="already running at http://127.0.0.1:2"):
            LocalCluster.up(root=tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_every_node_names_its_own_cluster_to_its_workers(tmp_path: Path, monkeypatch):
    """Each node's `ray start` (and so every worker it starts) gets the cluster's own
    dashboard as the State API's address: Ray Train's placement-group cleaner asks it with
    no address, and a scan of the machine finds every cluster on it (see
    `lmforge.cluster.private_cluster_options`)."""
    from lmforge import cluster

    envs: list[dict[str, str]] = []
    monkeypatch.setattr(LocalCluster, "_start_node",
                        lambda self, i, args, *rest: (envs.append(rest[-1]),
                                                      self.pids.append(0)))
    monkeypatch.setattr(LocalCluster, "wait_alive", lambda self, n, timeout_s=0: None)
    monkeypatch.setattr(LocalCluster, "_client_env", staticmethod(lambda home: {}))
    monkeypatch.setenv(cluster.STATE_API_ENV, "http://elsewhere:1")
    c = LocalCluster.up(nodes=2, root=tmp_path)
    assert [env[cluster.STATE_API_ENV] for env in envs] == [c.dashboard_url] * 2
