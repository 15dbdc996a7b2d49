"""A replica whose decode step hangs fails Serve's health check and is replaced.

The tiny model blocks in its forward pass while a flag file exists, the way a wedged
kernel or a deadlock would: the replica's event loop still answers, but `check_health`
reports the stalled step, and Serve swaps in a new replica process.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import httpx
from ray import serve

from lmforge.config import ServeConfig
from lmforge.registry import LoadedModel
from lmforge.serve import build_app, deploy

from ..ray_fixtures import tiny_model
from .helpers import free_port, replica_pids, replica_states, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

APP = "test-serve-health"


class Hangs:
    """A model whose forward pass does not return while `flag` exists."""

    def __init__(self, inner, flag: str) -> None:  # noqa: ANN001
        self.inner, self.config, self.flag = inner, inner.config, flag

    def parameters(self):  # noqa: ANN201
        return self.inner.parameters()

    def __call__(self, **kwargs):  # noqa: ANN003, ANN204
        while os.path.exists(self.flag):
            time.sleep(0.05)  # blocked, as long as the test wants
        return self.inner(**kwargs)


def hanging_model(uri: str, flag: str) -> LoadedModel:
    loaded = tiny_model(uri)
    return LoadedModel(Hangs(loaded.model, flag), loaded.tokenizer, loaded.name)


def test_a_replica_whose_decode_step_hangs_is_replaced(ray_cluster, tmp_path: Path):
    flag = tmp_path / "hang"
    cfg = ServeConfig(port=free_port(), max_tokens_limit=16, cpus_per_replica=0.5,
                      health_check_period_s=0.5, health_check_timeout_s=5, stall_timeout_s=1)
    loader = functools.partial(hanging_model, flag=str(flag))
    url = deploy(build_app(loader, cfg, "hangs"), cfg, name=APP)
    try:
        (hung_pid,) = replica_pids(APP)
        flag.touch()
        hung: list[int | str] = []

        def send() -> None:
            try:
                r = httpx.post(f"{url}/v1/completions", timeout=120,
                               json={"prompt": "the ", "max_tokens": 4})
                hung.append(r.status_code)
            except httpx.HTTPError as e:
                hung.append(type(e).__name__)

        stuck = threading.Thread(target=send)
        stuck.start()  # its first decode step never ends while the flag exists
        # Replaced: one RUNNING replica again, in another process. Its states change as
        # Serve notices the failed checks and starts the new one.
        wait_until(lambda: (replica_states(APP).get("RUNNING", 0) == 1
                            and (pids := replica_pids(APP)) and hung_pid not in pids),
                   "the hung replica replaced", timeout_s=300,
                   progress=lambda: replica_states(APP), stall_s=60, interval_s=0.2)
        flag.unlink()  # the new replica decodes normally
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200, r.text
        stuck.join(60)
        assert not stuck.is_alive() and hung  # answered (an error) rather than left hanging
    finally:
        flag.unlink(missing_ok=True)
        serve.shutdown()
