"""TrackingBuffer: the step loop never waits for MLflow; a fake client that fails, then
recovers, gets every metric in order; past the bound the oldest are dropped, counted, and
reported as tracking/dropped once the server is back; close keeps its deadline; a failed
run's error handler never hides the first error."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from lmforge.tracking import DROPPED_METRIC, RunTracker, TrackingBuffer, record_failure


class FlakyClient:
    """An MLflow client that is down until `up` is set; each call while down fails after
    `delay_s` (a connection timeout), each call while up records what it got."""

    def __init__(self, up: bool = True, delay_s: float = 0.0) -> None:
        self.up = threading.Event()
        if up:
            self.up.set()
        self.delay_s = delay_s
        self.metrics: list[Any] = []
        self.params: list[Any] = []
        self.failures = 0

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()
                  ) -> None:
        if not self.up.is_set():
            time.sleep(self.delay_s)
            self.failures += 1
            raise ConnectionError("connection refused")
        self.metrics.extend(metrics)
        self.params.extend(params)

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.metrics if m.key == key]


def wait_for(condition, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_an_outage_neither_blocks_the_loop_nor_loses_metrics():
    client = FlakyClient(up=False, delay_s=0.2)  # every attempt hangs 0.2 s, then fails
    buf = TrackingBuffer("run", client, retry_s=0.01, max_retry_s=0.05)
    buf.log_params({"model.parameters": 123})
    start = time.perf_counter()
    for step in range(1, 201):
        buf.log_metrics({"train_loss": 1.0 / step, "lr": 0.1}, step=step)
    assert time.perf_counter() - start < 0.1  # 200 steps logged while every call would hang
    wait_for(lambda: client.failures >= 2)
    assert client.metrics == []

    client.up.set()  # the server is back
    stats = buf.close(deadline_s=10)
    assert stats.sent == 400 and stats.dropped == 0
    assert client.values("train_loss") == [(s, 1.0 / s) for s in range(1, 201)]
    assert [(p.key, p.value) for p in client.params] == [("model.parameters", "123")]
    assert client.values(DROPPED_METRIC) == []  # nothing dropped, nothing to report


def test_past_the_bound_the_oldest_are_dropped_counted_and_reported_when_back(caplog):
    client = FlakyClient(up=False)
    buf = TrackingBuffer("run", client, capacity=20, retry_s=0.01, max_retry_s=0.02)
    for step in range(1, 51):
        buf.log_metrics({"train_loss": float(step), "lr": 0.1}, step=step)
    # A batch may be in flight (taken off the queue) when the bound is hit: 20 values
    # queued plus at most the one request being retried.
    assert 60 <= buf.stats().dropped <= 80
    assert sum("dropping the oldest" in r.message for r in caplog.records) == 1

    client.up.set()
    stats = buf.close(deadline_s=10)
    assert stats.dropped + stats.sent == 100
    steps = [s for s, _ in client.values("train_loss")]
    assert steps[-10:] == list(range(41, 51))  # the newest survive, in order
    assert client.values(DROPPED_METRIC) == [(50, float(stats.dropped))]


def test_close_gives_up_at_its_deadline_and_counts_the_rest():
    client = FlakyClient(up=False)
    buf = TrackingBuffer("run", client, retry_s=0.01, max_retry_s=0.02)
    for step in range(1, 11):
        buf.log_metrics({"train_loss": 1.0}, step=step)
    start = time.perf_counter()
    stats = buf.close(deadline_s=0.3)
    assert 0.3 <= time.perf_counter() - start < 2
    assert stats == type(stats)(sent=0, dropped=10)


def test_a_healthy_server_gets_everything_in_few_requests():
    calls = []

    class Counting(FlakyClient):
        def log_batch(self, run_id: str, metrics: Any = (), params: Any = (),
                      tags: Any = ()) -> None:
            calls.append(len(metrics))
            super().log_batch(run_id, metrics, params, tags)

    client = Counting()
    buf = TrackingBuffer("run", client)
    for step in range(1, 1001):
        buf.log_metrics({"a": step, "b": step}, step=step)
    assert buf.close(deadline_s=10).sent == 2000
    assert all(n <= 1000 for n in calls)


class BrokenTracker(RunTracker):
    """A tracker whose every MLflow call fails, as during an outage."""

    @property
    def client(self):  # noqa: ANN201
        raise ConnectionError("MLflow is down")


def test_recording_a_failure_during_an_outage_keeps_the_first_error(caplog):
    tracker = BrokenTracker("http://127.0.0.1:1", "run")
    with pytest.raises(ValueError, match="the real problem"):
        try:
            raise ValueError("the real problem")
        except ValueError as e:
            record_failure(tracker, e, "traceback", curve=True)
            raise
    assert "could not record" in caplog.text


def test_drain_waits_for_a_healthy_server_and_never_for_a_down_one():
    client = FlakyClient(up=True, delay_s=0.05)
    buf = TrackingBuffer("run", client, retry_s=0.01, max_retry_s=0.05)
    buf.log_metrics({"val_loss": 2.5}, step=10)
    assert buf.drain(timeout_s=5)  # sent before drain returns: a kill after it loses nothing
    assert client.values("val_loss") == [(10, 2.5)]

    client.up.clear()  # an outage: the next request fails
    buf.log_metrics({"val_loss": 2.4}, step=20)
    wait_for(lambda: client.failures >= 1)
    start = time.perf_counter()
    assert not buf.drain(timeout_s=5)
    assert time.perf_counter() - start < 0.5  # the step loop is not held by an outage
    client.up.set()
    assert buf.close(deadline_s=10).dropped == 0
    assert client.values("val_loss") == [(10, 2.5), (20, 2.4)]


class TableClient(FlakyClient):
    """FlakyClient that also takes tables; `tables_fail` makes every table upload fail."""

    def __init__(self, tables_fail: bool) -> None:
        super().__init__()
        self.tables_fail = tables_fail
        self.tables: list[tuple[Any, str]] = []
        self.table_attempts = 0

    def log_table(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.table_attempts += 1
        if self.tables_fail:
            raise PermissionError("artifact store not writable")
        self.tables.append((data.to_dict("records"), artifact_file))


def test_tables_go_out_in_order_and_a_failing_one_never_holds_metrics():
    ok = TableClient(tables_fail=False)
    buf = TrackingBuffer("run", ok, retry_s=0.01, max_retry_s=0.02)
    buf.log_metrics({"val_loss": 2.0}, step=10)
    buf.log_table([{"step": 10, "prompt": "p", "completion": "c"}], "samples.json")
    buf.log_metrics({"val_loss": 1.0}, step=20)
    assert buf.close(5).dropped == 0
    assert ok.tables == [([{"step": 10, "prompt": "p", "completion": "c"}], "samples.json")]
    assert ok.values("val_loss") == [(10, 2.0), (20, 1.0)]

    broken = TableClient(tables_fail=True)
    buf = TrackingBuffer("run", broken, retry_s=0.01, max_retry_s=0.02)
    buf.log_table([{"step": 10}], "samples.json")
    buf.log_metrics({"val_loss": 1.0}, step=10)
    assert buf.close(5).dropped == 0  # the metric behind the table got through
    assert broken.values("val_loss") == [(10, 1.0)]
    assert broken.table_attempts == 3


class GatedClient(TableClient):
    """TableClient whose calls each wait for `gate` (then record their order in `calls`)."""

    def __init__(self) -> None:
        super().__init__(tables_fail=False)
        self.gate = threading.Event()
        self.calls: list[str] = []

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()
                  ) -> None:
        self.gate.wait()
        self.calls.append("metrics")
        super().log_batch(run_id, metrics, params, tags)

    def log_table(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.gate.wait()
        self.calls.append("table")
        super().log_table(run_id, data, artifact_file)


def test_metrics_overtake_a_queued_table_and_drain_waits_for_metrics_only():
    """What a process ended right after a report must not lose is its metrics: a table
    waiting in the queue goes after them, and `drain` (before a report that may stop the
    trial) does not wait for a table's upload, the slowest request."""
    client = GatedClient()
    buf = TrackingBuffer("run", client, retry_s=0.01, max_retry_s=0.02)
    buf.log_metrics({"train_loss": 2.0}, step=9)  # in flight, held at the gate
    wait_for(lambda: buf._in_flight is not None)
    buf.log_table([{"step": 10}], "samples.json")
    buf.log_metrics({"val_loss": 1.5}, step=10)
    assert not buf.drain(0.05)  # metrics are waiting
    client.gate.set()
    assert buf.drain(5)
    assert buf.close(5).dropped == 0
    assert client.calls == ["metrics", "metrics", "table"]
    assert client.values("val_loss") == [(10, 1.5)]

    slow = GatedClient()  # a table in flight, nothing else queued: nothing to wait for
    buf = TrackingBuffer("run", slow, retry_s=0.01, max_retry_s=0.02)
    buf.log_table([{"step": 10}], "samples.json")
    wait_for(lambda: buf._in_flight is not None)
    start = time.perf_counter()
    assert buf.drain(5) and time.perf_counter() - start < 0.5
    slow.gate.set()
    assert buf.close(5).dropped == 0 and slow.calls == ["table"]
