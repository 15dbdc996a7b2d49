"""Fixtures of the multi-host tests: hosts built by harness.py, torn down whatever happens.

Every test here gets the `multihost` marker (tests/conftest.py) and is skipped, with the
reason, where the machine cannot build the hosts (not root, no `ip netns`, no `unshare`).
Run them with `make test-multihost`; they start Ray nodes, so on a shared machine hold the
Ray lock: `flock /tmp/lmforge-ray.lock make test-multihost`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from .harness import Hosts, unavailable

unavailable = cache(unavailable)  # one probe namespace per session, not one per test


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    mine = [item for item in items if item.path.is_relative_to(here)]
    if mine and (why := unavailable()):
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=f"multi-host harness: {why}"))


@pytest.fixture(scope="session")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Two hosts, one Ray node of 1 CPU each (h1 the head), S3 and MLflow (~35 s to build
    on 2 cores): shared by every test that leaves the cluster as it found it; each keeps
    to its own prefix of the bucket."""
    with Hosts.up(tmp_path_factory.mktemp("hosts"), hosts=2, cpus=1) as hosts:
        yield hosts


@pytest.fixture
def three_hosts(tmp_path: Path) -> Iterator[Hosts]:
    """Three hosts of 1 CPU each, for a test that takes one of them away."""
    with Hosts.up(tmp_path / "hosts", hosts=3, cpus=1) as hosts:
        yield hosts
