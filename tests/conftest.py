"""For the whole suite: markers by folder, a private temp dir, and the shared Ray fixtures.

`pytestmark` in a conftest marks nothing, so every test under tests/integration gets the
`integration` marker here, every one under tests/chaos the `chaos` marker and every one
under tests/multihost the `multihost` marker: `-m integration` / `-m "not integration"` /
`-m chaos` / `-m multihost` select what they say. A test marked `gpu` is skipped where
torch sees no CUDA device. The Ray, MLflow and Serve fixtures both integration/ and chaos/
use live in tests/ray_fixtures.py, loaded here as a plugin (only a top-level conftest may
name plugins).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.ray_fixtures"]

INTEGRATION = Path(__file__).parent / "integration"
CHAOS = Path(__file__).parent / "chaos"
MULTIHOST = Path(__file__).parent / "multihost"


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
        elif item.path.is_relative_to(CHAOS):
            item.add_marker(pytest.mark.chaos)
        elif item.path.is_relative_to(MULTIHOST):
            item.add_marker(pytest.mark.multihost)
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch  # only when a gpu test was collected: importing torch takes seconds

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session", autouse=True)
def _private_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TMPDIR for this session and every process it starts, removed at the end.

    What the code under test puts in the system temp dir (models loaded for serving,
    torch.compile's kernel cache, multiprocessing's dirs, a subprocess's own Ray cluster
    under TMPDIR/ray) then neither piles up in /tmp, nor makes a second run take another
    path than the first (a warm compile cache), nor meets another Ray user's /tmp/ray (its
    ray_current_cluster file names "the" cluster to clients given no address). Short and
    directly under /tmp, not in pytest's basetemp: Ray's unix socket paths under it must
    stay below 108 bytes.
    """
    tmp_path_factory.getbasetemp()  # pytest's own tmp dirs stay where they were
    path = Path(tempfile.mkdtemp(prefix="lmf-t-", dir="/tmp"))
    mp = pytest.MonkeyPatch()
    mp.setenv("TMPDIR", str(path))
    mp.setattr(tempfile, "tempdir", str(path))  # tempfile caches the dir it first found
    yield path
    mp.undo()
    shutil.rmtree(path, ignore_errors=True)
