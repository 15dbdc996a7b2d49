"""The integration tests' session: Ray's settings and the no-training-left guard turned on
for every test here. The fixtures themselves (`ray_cluster`, `tiny_spec`, ...) live in
tests/ray_fixtures.py, shared with tests/chaos.

The `integration` marker is applied to everything in this folder by tests/conftest.py
(`pytestmark` in a conftest marks nothing). Shared helpers live in helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _ray_settings(ray_settings: None) -> Iterator[None]:
    yield


@pytest.fixture(autouse=True)
def _no_training_left_running(no_training_left_running: None) -> Iterator[None]:
    yield
