"""Every spec under jobs/ (bench specs included) loads with lmforge.config.load, and each
top-level spec opens with a comment header showing how to run it locally and on a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import load

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SPECS = sorted(JOBS.rglob("*.yaml"))
SHARED = JOBS.parents[1] / "shared"  # the benchmark corpus lives beside the checkout


def test_the_common_cases_are_there():
    names = {p.name for p in JOBS.glob("*.yaml")}
    assert {"quickstart.yaml", "pretrain_gpt2_small.yaml", "tune_search.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(JOBS)))
def test_spec_validates(path: Path):
    if "../shared/" in path.read_text() and not SHARED.is_dir():
        pytest.skip(f"needs {SHARED} (the benchmark corpus), absent beside this checkout")
    spec = load(path, [])
    assert spec.tracking.run_name


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_spec_header_shows_local_and_cluster_commands(path: Path):
    assert path.read_text().startswith("#")
    text = "\n".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))
    assert "lmforge run" in text or "lmforge train" in text or "lmforge tune" in text
    assert "lmforge submit" in text
