"""Autoscaling and recovery under real load: replicas go up with traffic and back down
after it, and a replica process killed mid-load is replaced, failing at most the requests
it held.

One autoscaled Serve app (1 to 2 replicas of half a CPU each, short delays and window)
over test_serve_ops's slow tiny model, so a few closed-loop clients keep replicas busy
without using the CPUs. Replica counts come from `serve.status()`, polled with a deadline.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import cloudpickle
import httpx
import pytest
from ray import serve

from lmforge.config import ServeConfig
from lmforge.serve import build_app, deploy

from .helpers import free_port, replica_pids, replica_states, wait_until
from .test_serve_ops import slow_model

cloudpickle.register_pickle_by_value(sys.modules[__name__])

APP = "test-serve-scaling"
CLIENTS = 6  # closed-loop load: 3 per replica at 2 replicas, over the target of 2
BODY = {"prompt": "the ", "max_tokens": 16}  # ~1 s of the slow model's decoding


@pytest.fixture(scope="module")
def scaling(ray_cluster) -> Iterator[tuple[str, ServeConfig]]:
    cfg = ServeConfig(port=free_port(), min_replicas=1, max_replicas=2,
                      target_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=2,
                      look_back_period_s=2, max_batch_size=4, max_ongoing_requests=4,
                      max_queued_requests=-1, max_tokens_limit=32, cpus_per_replica=0.5)
    url = deploy(build_app(slow_model, cfg, "slow"), cfg, name=APP)
    yield url, cfg
    serve.shutdown()


def replicas_reach(states: dict[str, int], what: str, timeout_s: float = 300) -> None:
    """Wait until Serve reports exactly `states`; failing when the replicas' states have
    not changed for a minute (a replica starting on a loaded machine takes a while)."""
    wait_until(lambda: replica_states(APP) == states, what, timeout_s=timeout_s,
               progress=lambda: replica_states(APP), stall_s=60, interval_s=0.2,
               detail=lambda: f"replicas: {replica_states(APP)}")


def answered(load: Load, since: float, n: int, what: str) -> None:
    """Wait until `n` requests sent after `since` were answered 200; failing when no
    request at all has been answered for 30 s."""
    wait_until(lambda: load.answered_since(since) >= n, what, timeout_s=300,
               progress=lambda: len(load.results), stall_s=30, interval_s=0.2,
               detail=lambda: f"replicas: {replica_states(APP)}")


@dataclass
class Load:
    """A closed loop: each of `clients` threads sends the next request as soon as the last
    is answered. `results`: (start, end, status code or exception name) per request."""

    url: str
    clients: int
    results: list[tuple[float, float, int | str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(self.clients)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    outcome: int | str = http.post("/v1/completions", json=BODY).status_code
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                self.results.append((start, time.monotonic(), outcome))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def answered_since(self, t: float) -> int:
        return sum(1 for start, _, outcome in self.results if start > t and outcome == 200)


def test_load_adds_a_replica_and_its_end_removes_it(scaling):
    url, cfg = scaling
    assert replica_states(APP) == {"RUNNING": cfg.min_replicas}
    with Load(url, CLIENTS) as load:
        replicas_reach({"RUNNING": cfg.max_replicas}, "scaled up under load")
        scaled_up = time.monotonic()
        answered(load, scaled_up, CLIENTS, "requests answered at 2 replicas")
    outcomes = {outcome for _, _, outcome in load.results}
    assert outcomes == {200}, outcomes  # scaling up drops nothing
    replicas_reach({"RUNNING": cfg.min_replicas}, "scaled down after the load")
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=30).status_code == 200


def test_a_replica_killed_under_load_is_replaced_failing_only_its_requests(scaling):
    url, cfg = scaling
    with Load(url, CLIENTS) as load:
        replicas_reach({"RUNNING": cfg.max_replicas}, "scaled up under load")
        pids = replica_pids(APP)
        assert len(pids) == cfg.max_replicas, pids
        victim = min(pids)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)  # the process, as when its node goes away
        # Back to the target (the load keeps it at max_replicas) with a new process.
        wait_until(lambda: (replica_states(APP) == {"RUNNING": cfg.max_replicas}
                            and victim not in (live := replica_pids(APP))
                            and len(live) == cfg.max_replicas),
                   "killed replica replaced", timeout_s=300,
                   progress=lambda: replica_states(APP), stall_s=60, interval_s=0.2,
                   detail=lambda: f"replicas: {replica_states(APP)}")
        recovered = time.monotonic()
        answered(load, recovered, 2 * CLIENTS, "requests answered after recovery")
    failed = [(start, end, outcome) for start, end, outcome in load.results
              if outcome != 200]
    # Only what the killed replica held can fail, each request once: its running batch,
    # the requests waiting for a slot and any still sending a body (the replica admits
    # them itself, so Serve routes it more than max_ongoing_requests): at most the load's
    # clients, and only requests under way between the kill and the recovery.
    assert len(failed) <= CLIENTS, failed
    assert all(end > killed and start < recovered for start, end, _ in failed), failed
    after = [outcome for start, _, outcome in load.results if start > recovered]
    assert after and set(after) == {200}, after
