"""The chaos suite: each scenario holds a load, injects faults, and asserts what was lost
(the target is nothing). Run by `make test-chaos`, never by `make test`.

- `chaos_scale` (env `LMFORGE_CHAOS_SCALE`, a float > 0, default 1): 1 is the CI-sized
  scenario (the whole suite within CI's budget); larger stretches durations and counts
  toward the issue's full scenario (for example 6: a 30 s overload becomes 3 minutes).
  Each test's pytest-timeout grows with it.
- `chaos_result(scenario, load=..., faults=..., lost=..., **figures)`: every scenario calls
  it once with what it measured, before asserting; with `LMFORGE_CHAOS_REPORT` set, a row
  is appended there (a `.md` file: a markdown table; anything else: JSON lines), which is
  where the table in docs/testing.md comes from.

Ray's settings and the no-training-left guard are on for every test here, as in
tests/integration; the fixtures themselves live in tests/ray_fixtures.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .report import REPORT_ENV, ChaosResult, chaos_scale_from_env, write_row


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A scaled-up scenario runs longer: its outer bound (pyproject's 900 s) grows with it."""
    here = Path(__file__).parent
    chaos = [item for item in items if item.path.is_relative_to(here)]
    if not chaos:
        return
    scale = chaos_scale_from_env()
    base = float(config.getini("timeout") or 900)
    for item in chaos:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(base * max(1.0, scale)))


@pytest.fixture(scope="session", autouse=True)
def _ray_settings(ray_settings: None) -> Iterator[None]:
    yield


@pytest.fixture(autouse=True)
def _no_training_left_running(no_training_left_running: None) -> Iterator[None]:
    yield


@pytest.fixture(scope="session")
def chaos_scale() -> float:
    """How far to stretch each scenario: 1 (CI-sized) unless LMFORGE_CHAOS_SCALE says."""
    return chaos_scale_from_env()


@pytest.fixture
def chaos_result(chaos_scale: float, request: pytest.FixtureRequest) -> ChaosResult:
    """Record one scenario's outcome: `chaos_result(scenario, load=..., faults=...,
    lost=..., **figures)`, strings for the table and any measured figures (numbers or
    short strings). Returns the row; appends it to $LMFORGE_CHAOS_REPORT when set. Call it
    before the asserts, so a scenario that lost something is in the report too."""

    def record(scenario: str, *, load: str, faults: str, lost: str,
               **figures: float | int | str) -> dict:
        row = {"scenario": scenario, "test": request.node.nodeid, "scale": chaos_scale,
               "load": load, "faults": faults, "lost": lost,
               "figures": {k: round(v, 3) if isinstance(v, float) else v
                           for k, v in figures.items()},
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if report := os.environ.get(REPORT_ENV):
            write_row(Path(report), row)
        return row

    return record
