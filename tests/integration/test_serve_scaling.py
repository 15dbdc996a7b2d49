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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cloudpickle
import httpx
import pytest
import ray
from ray import serve
from ray.util.state import list_actors

from lmforge.config import ServeConfig
from lmforge.serve import build_app, deploy

from .conftest import free_port
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


def replica_states() -> dict[str, int]:
    """The deployment's replicas by state, as Serve reports them: {"RUNNING": 2}."""
    deployment = serve.status().applications[APP].deployments["TextGenerator"]
    # Typed as ReplicaState keys, built from their string values: accept either.
    return {getattr(state, "value", state): n
            for state, n in deployment.replica_states.items() if n}


def replica_pids() -> set[int]:
    """PIDs of the live replica processes, from Ray's state API."""
    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # this test's cluster
                         filters=[("class_name", "=", f"ServeReplica:{APP}:TextGenerator"),
                                  ("state", "=", "ALIVE")])
    return {a.pid for a in actors}


def wait_until(done: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s " \
                                            f"(replicas: {replica_states()})"
        time.sleep(0.2)  # poll interval


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
    assert replica_states() == {"RUNNING": cfg.min_replicas}
    with Load(url, CLIENTS) as load:
        wait_until(lambda: replica_states() == {"RUNNING": cfg.max_replicas},
                   "scaled up under load", 60)
        scaled_up = time.monotonic()
        wait_until(lambda: load.answered_since(scaled_up) >= CLIENTS,
                   "requests answered at 2 replicas", 30)
    outcomes = {outcome for _, _, outcome in load.results}
    assert outcomes == {200}, outcomes  # scaling up drops nothing
    wait_until(lambda: replica_states() == {"RUNNING": cfg.min_replicas},
               "scaled down after the load", 60)
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=30).status_code == 200


def test_a_replica_killed_under_load_is_replaced_failing_only_its_requests(scaling):
    url, cfg = scaling
    with Load(url, CLIENTS) as load:
        wait_until(lambda: replica_states() == {"RUNNING": cfg.max_replicas},
                   "scaled up under load", 60)
        pids = replica_pids()
        assert len(pids) == cfg.max_replicas, pids
        victim = min(pids)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)  # the process, as when its node goes away
        # Back to the target (the load keeps it at max_replicas) with a new process.
        wait_until(lambda: (replica_states() == {"RUNNING": cfg.max_replicas}
                            and victim not in (live := replica_pids())
                            and len(live) == cfg.max_replicas),
                   "killed replica replaced", 60)
        recovered = time.monotonic()
        wait_until(lambda: load.answered_since(recovered) >= 2 * CLIENTS,
                   "requests answered after recovery", 30)
    failed = [(start, end, outcome) for start, end, outcome in load.results
              if outcome != 200]
    # Only what the killed replica held can fail: it never holds more than
    # max_ongoing_requests (its running batch and the requests waiting for the next).
    assert len(failed) <= cfg.max_ongoing_requests, failed
    assert all(end > killed and start < recovered for start, end, _ in failed), failed
    after = [outcome for start, _, outcome in load.results if start > recovered]
    assert after and set(after) == {200}, after
