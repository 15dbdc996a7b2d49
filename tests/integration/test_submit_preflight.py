"""`lmforge submit` to a cluster whose `python` lacks lmforge's dependencies, as when a user
runs `.venv/bin/ray start --head` without activating the venv: without the preflight the
job fails later with ModuleNotFoundError deep in its log; with it, submit fails at once
naming what is missing and how to provide it, and submits nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lmforge.cluster import LocalCluster

from .helpers import lmforge, user_env

SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs a system /usr/bin/python3")
def test_submit_to_a_cluster_without_lmforges_dependencies_fails_at_once(tmp_path: Path):
    # The cluster's `python` is the system one: a PATH without the venv, as in a fresh shell.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(SYSTEM_PYTHON)
    home = tmp_path / "home"
    with LocalCluster.up(nodes=1, cpus_per_node=1, root=tmp_path / "cluster", home=home,
                         node_path=f"{bin_dir}:{os.environ['PATH']}") as cluster:
        env = user_env(home)
        spec = "tests/integration/specs/tiny.yaml"
        address = cluster.dashboard_url

        # The failure the preflight prevents: the job itself dies on its first import.
        start = time.monotonic()
        unchecked = lmforge("submit", spec, "--address", address, "--no-preflight", "--wait",
                            env=env, timeout_s=300)
        unchecked_s = time.monotonic() - start
        assert unchecked.returncode == 1, unchecked.stderr[-3000:]
        assert "ModuleNotFoundError: No module named" in unchecked.stdout, \
            unchecked.stdout[-3000:]

        start = time.monotonic()
        checked = lmforge("submit", spec, "--address", address, env=env, timeout_s=300)
        checked_s = time.monotonic() - start
        assert checked.returncode == 1, checked.stdout[-3000:] + checked.stderr[-3000:]
        err = " ".join(checked.stderr.split())  # rich wraps long lines
        assert f"the job's `python` ({bin_dir / 'python'}, Python 3." in err, err
        assert "typer" in err and "missing" in err
        for way in ("cluster/Dockerfile", "ray start", "--runtime-env-json"):
            assert way in err, way
        assert checked.stdout == ""  # no job id: nothing was submitted
        print(f"without preflight: failed after {unchecked_s:.1f} s; "
              f"with preflight: refused after {checked_s:.1f} s")
