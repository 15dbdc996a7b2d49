"""Operating the endpoint: overload is refused at once (429 + Retry-After), a slow request
times out with 408 (whatever its headers say), so does a body sent too slowly, and the
Prometheus metrics count requests and tokens by model version.

A deliberately slow tiny model (each forward pass sleeps) makes the limits reachable with
a handful of requests; one Serve app (one replica, batch size 1, one request in flight,
one queued) serves the whole module.
"""

from __future__ import annotations

import functools
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import httpx
import pytest
import ray
from ray import serve

from lmforge.config import ServeConfig
from lmforge.serve import build_app, deploy

from ..ray_fixtures import paced_model
from .helpers import free_port, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEP_S = 0.05  # seconds each forward pass of the slow model takes
# Greedy, this model's answer runs all 60 tokens (3 s); sampled, it may stop at once.
LONG = {"prompt": "the ", "max_tokens": 60, "temperature": 0}


slow_model = functools.partial(paced_model, step_s=STEP_S)


@pytest.fixture(scope="module")
def endpoint(ray_cluster):
    cfg = ServeConfig(port=free_port(), max_batch_size=1, max_tokens_limit=60,
                      cpus_per_replica=0.5, max_ongoing_requests=1, max_queued_requests=1,
                      backpressure_status=429, retry_after_s=2, request_timeout_s=2.0,
                      body_timeout_s=1.0)
    url = deploy(build_app(slow_model, cfg, "slow"), cfg, name="test-serve-ops")
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client
    serve.shutdown()


def test_overload_is_refused_at_once_with_429_and_retry_after(endpoint: httpx.Client):
    """One request decoding (its first token read), then 7 at once: one of them waits for
    the slot and is answered, the rest are refused at once.

    The decoding request goes first, alone: of requests that arrive together, Serve's
    router may refuse all but one while that one is routed (its `max_queued_requests`
    count is checked before the first is assigned; `Router.wrap_request_assignment`
    says so), so a burst alone guarantees only one answer."""
    def send(_: int) -> tuple[int, float, str | None]:
        start = time.perf_counter()
        r = endpoint.post("/v1/completions", json={"prompt": "the ", "max_tokens": 10})
        return r.status_code, time.perf_counter() - start, r.headers.get("retry-after")

    decoding = {"prompt": "the ", "max_tokens": 10, "temperature": 0, "stream": True}
    with endpoint.stream("POST", "/v1/completions", json=decoding) as first:
        lines = first.iter_lines()
        assert first.status_code == 200 and next(line for line in lines if line)
        with ThreadPoolExecutor(7) as pool:
            results = list(pool.map(send, range(7)))
        assert "data: [DONE]" in list(lines)  # the decoding request ran to its end
    codes = [c for c, _, _ in results]
    # The one waiting is answered (more, if the decoding one ended while they came in).
    assert codes.count(200) >= 1 and codes.count(429) >= 3, codes
    assert set(codes) <= {200, 429}, codes
    refused = [(t, ra) for c, t, ra in results if c == 429]
    assert all(ra == "2" for _, ra in refused)
    one_request_s = 10 * STEP_S
    assert min(t for t, _ in refused) < one_request_s  # at once, before any slot frees


def test_a_request_past_the_timeout_gets_408(endpoint: httpx.Client):
    start = time.perf_counter()
    r = endpoint.post("/v1/completions", json=LONG)
    assert r.status_code == 408, r.text
    assert time.perf_counter() - start < 60 * STEP_S  # cut at the timeout, not the end
    fine = endpoint.post("/v1/completions", json={"prompt": "the ", "max_tokens": 4})
    assert fine.status_code == 200  # the replica is not stuck after a timeout


def test_a_client_cannot_lift_the_timeout(endpoint: httpx.Client):
    """Serve's proxy drops its own timeout for a request carrying this header; the
    replica's holds."""
    start = time.perf_counter()
    r = endpoint.post("/v1/completions", json=LONG, headers={"x-request-timeout-seconds": "0"})
    assert r.status_code == 408, r.text
    assert time.perf_counter() - start < 60 * STEP_S


def test_a_body_sent_too_slowly_gets_408_and_frees_the_replica(endpoint: httpx.Client):
    host, port = endpoint.base_url.host, endpoint.base_url.port
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"prompt": ')  # ... and the rest never comes
        answer = slow.makefile("rb")
        status = answer.readline()
        headers = list(iter(answer.readline, b"\r\n"))  # up to the blank line
        length = next(int(h.split(b":")[1]) for h in headers
                      if h.lower().startswith(b"content-length:"))
        body = answer.read(length)
    assert status.startswith(b"HTTP/1.1 408"), status
    assert b"not received within 1 s" in body, body
    assert time.perf_counter() - start < 5
    # The only slot is free again (max_ongoing_requests=1): a whole request goes through.
    fine = endpoint.post("/v1/completions", json={"prompt": "the ", "max_tokens": 4})
    assert fine.status_code == 200


def test_prometheus_metrics_count_requests_and_tokens_by_model_version(
        endpoint: httpx.Client):
    r = endpoint.post("/v1/completions", json={"prompt": "the ", "max_tokens": 5,
                                               "temperature": 0})
    assert r.status_code == 200
    port = ray._private.worker._global_node.metrics_export_port
    wanted = ("ray_lmforge_requests_total", "ray_lmforge_generated_tokens_total",
              "ray_lmforge_time_to_first_token_s_bucket", "ray_lmforge_tokens_per_s_bucket",
              "ray_serve_num_http_requests")  # ours beside Ray Serve's own
    url = f"http://127.0.0.1:{port}/metrics"

    def exported() -> str:  # the metrics agent exports on an interval
        text = httpx.get(url, timeout=10).text
        # This app's series, not just the names: the apps of earlier tests on the session
        # cluster export the same names, with their own model_version.
        ours = any(line.startswith("ray_lmforge_generated_tokens_total{")
                   and 'model_version="slow"' in line for line in text.splitlines())
        return text if ours and all(w in text for w in wanted) else ""

    text = wait_until(exported, "this app's metrics exported", timeout_s=60, interval_s=1,
                      detail=lambda: httpx.get(url, timeout=10).text[-3000:])
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    ours = [line for line in text.splitlines()
            if line.startswith("ray_lmforge_generated_tokens_total{")]
    assert any('model_version="slow"' in line for line in ours), ours
    tokens = sum(float(line.rsplit(" ", 1)[1]) for line in ours)
    assert tokens >= 5
