"""Real services for the integration tests: a local Ray cluster, MLflow stores, free ports."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from lmforge.config import JobSpec, load

SPEC = Path(__file__).parent / "specs" / "tiny.yaml"

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One private local Ray cluster (2 logical CPUs, like CI) for the whole session."""
    ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def tiny_spec(tmp_path: Path):
    """Load the tiny spec with every piece of state under this test's tmp_path."""
    def make(*overrides: str) -> JobSpec:
        return load(SPEC, [
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.storage_path={tmp_path / 'ray'}",
            f"tune.storage_path={tmp_path / 'ray'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"serve.port={free_port()}",
            *overrides,
        ])
    return make
