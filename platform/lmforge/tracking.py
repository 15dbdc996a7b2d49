"""MLflow runs, addressed explicitly by (tracking URI, run id).

`RunTracker` holds two strings, so it pickles to Ray workers on any node, and every call
goes through an `MlflowClient` for that URI: no process-global active run, so concurrent
trials cannot cross their metrics, and no working directory is assumed. Only world rank 0
of a training run logs, through a `TrackingBuffer`: an MLflow outage must never stall or
kill training, so the step loop only queues, and a background thread does the sending and
the retrying.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
DROPPED_METRIC = "tracking/dropped"
"""Logged when the server is reachable again after metrics were dropped: how many so far."""

logger = logging.getLogger(__name__)


def experiment_id(uri: str, name: str, artifact_root: Path | None) -> str:
    """Get or create the experiment. With the embedded SQLite default, artifacts go to
    `artifact_root` (runs/mlartifacts); a tracking server decides for itself."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None and uri.startswith("sqlite:"):
        location = artifact_root.resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass(frozen=True)
class RunTracker:
    uri: str
    run_id: str

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, parent: RunTracker | None = None,
              tags: dict[str, str] | None = None) -> RunTracker:
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags[PARENT_TAG] = parent.run_id
        run = MlflowClient(uri).create_run(experiment, run_name=name, tags=all_tags)
        return cls(uri, run.info.run_id)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table artifact (the UI's "Evaluation" table view reads it)."""
        import pandas as pd

        self.client.log_table(self.run_id, pd.DataFrame(rows), artifact_file)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float) -> Iterator[None]:
        """MLflow's own system-metrics sampler (psutil: CPU, memory, disk, network) on this
        run, for the duration of the block; `interval_s` 0 turns it off."""
        if interval_s <= 0:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s,
                                       tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def log_loss_curve(self) -> None:
        """Training and validation loss against step, as a PNG artifact."""
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("train_loss", "val_loss"):
            points = sorted(self.metric_history(key))
            if points:
                ax.plot(*zip(*points, strict=True), label=key, marker="." if key == "val_loss"
                        else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        self.client.log_figure(self.run_id, fig, "loss_curve.png")
        plt.close(fig)


PACKAGES = ("lmforge", "ray", "torch", "transformers", "datasets", "tokenizers", "mlflow",
            "optuna")


def lineage_tags(data_fingerprint: str, tokenizer: str) -> dict[str, str]:
    """What every run records about where it came from: data fingerprint, tokenizer,
    package versions, and the git commit when the working directory is a checkout."""
    tags = {"lmforge.data_fingerprint": data_fingerprint, "lmforge.tokenizer": tokenizer,
            "lmforge.versions": json.dumps({p: md.version(p) for p in PACKAGES})}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: spec fields as MLflow params."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat |= flatten(v, f"{key}.")
        else:
            flat[key] = json.dumps(v) if isinstance(v, list | dict) else v
    return flat


# --- rank 0's buffer: tracking never stops training ----------------------------------


class BatchLogger(Protocol):
    """What the buffer needs of a tracking client (`MlflowClient` has it; tests pass a fake
    that fails, then recovers)."""

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()
                  ) -> Any: ...


CLIENT_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's own HTTP retries (7, with backoff: minutes of blocking) turned down in a
process whose only MLflow user is a buffer, which retries by itself without blocking
anyone; a request still gets 10 s to answer (one slow request holds the sender, not the
loop)."""

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per request
TABLE_ATTEMPTS = 3
"""Attempts at one table upload before it is given up (tables are best effort)."""


@dataclass(frozen=True)
class BufferStats:
    sent: int
    """Metric values that reached MLflow."""
    dropped: int
    """Metric values lost: the oldest dropped past the bound during an outage, plus what
    was still unsent when `close` gave up."""


class TrackingBuffer:
    """Metrics, params and tables (`log_table`: the samples) of one MLflow run, queued by the
    step loop and sent by a background thread (metrics and params in order, tables once
    none of those wait).

    `log_metrics` and `log_params` never block on MLflow and never raise for it: they
    append to a queue and return. The sender thread sends in order, merging queued metric
    batches into requests of up to 1,000 values; when a request fails (server down, slow,
    erroring) it retries the same request with exponential back-off (`retry_s` doubling up
    to `max_retry_s`), warning once when the outage starts and once when it ends. Past
    `capacity` queued metric values the oldest batch is dropped and counted (one warning
    per outage); once the server answers again, the count so far goes out as
    `tracking/dropped` at the latest step. Params are few (logged once) and never dropped.

    `close(deadline_s)` waits up to the deadline for the queue to drain, then gives up on
    the rest (counted as dropped) and returns what was sent and lost.
    """

    def __init__(self, run_id: str, client: BatchLogger, capacity: int = 10_000,
                 retry_s: float = 0.5, max_retry_s: float = 10.0) -> None:
        self.run_id = run_id
        self._client = client
        self._capacity = capacity
        self._retry_s, self._max_retry_s = retry_s, max_retry_s
        # ("metrics" | "params" | "table", items), in the order they were logged
        self._queue: deque[tuple[str, list[Any]]] = deque()
        self._queued = 0  # metric values in the queue
        self._in_flight: tuple[str, list[Any]] | None = None  # taken off, not yet sent
        self._cond = threading.Condition()
        self._closing = False
        self._give_up = threading.Event()  # close's deadline passed: stop retrying
        self._sent = self._dropped = self._dropped_logged = 0
        self._outage_warned = False
        self._down = False  # the last request failed: MLflow is in an outage
        self._table_failures = 0  # failed attempts of the table in flight
        self._last_step = 0
        self._thread = threading.Thread(target=self._run, name="lmforge-tracking",
                                        daemon=True)  # never keeps a finished worker alive
        self._thread.start()

    @classmethod
    def for_run(cls, tracker: RunTracker, capacity: int = 10_000) -> TrackingBuffer:
        """A buffer sending to `tracker`'s run, with MLflow's own retries turned down in
        this process (`CLIENT_RETRY_ENV`): for a process where the buffer is the only
        MLflow user, as in a training worker."""
        os.environ.update(CLIENT_RETRY_ENV)
        return cls(tracker.run_id, tracker.client, capacity)

    # --- the step loop's side: append and return --------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)  # when measured, not when sent
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._cond:
            self._last_step = max(self._last_step, step)
            self._queue.append(("metrics", batch))
            self._queued += len(batch)
            while self._queued > self._capacity and self._drop_oldest():
                pass
            self._cond.notify()

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        with self._cond:
            for i in range(0, len(items), 100):  # MLflow's per-request limit on params
                self._queue.append(("params", items[i : i + 100]))
            self._cond.notify()

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows appended to a table artifact (MLflow's `log_table` appends), sent in order
        with the metrics. Best effort: a table whose upload fails TABLE_ATTEMPTS times (an
        outage, or an artifact store this process cannot write) is given up with a
        warning, so it never holds the metrics queued behind it."""
        with self._cond:
            self._queue.append(("table", [(rows, artifact_file)]))
            self._cond.notify()

    def _drop_oldest(self) -> bool:
        """Drop the oldest queued metric batch (lock held); False when there is none."""
        for i, (kind, items) in enumerate(self._queue):
            if kind == "metrics":
                del self._queue[i]
                self._queued -= len(items)
                if not self._outage_warned:
                    self._outage_warned = True
                    logger.warning("MLflow unreachable with %d metric values queued: dropping "
                                   "the oldest, counted in tracking/dropped", self._capacity)
                self._dropped += len(items)
                return True
        return False

    def stats(self) -> BufferStats:
        with self._cond:
            return BufferStats(self._sent, self._dropped)

    # --- the sender thread -------------------------------------------------------------

    def _take(self) -> tuple[str, list[Any]] | None:
        """Take the next request off the queue (lock held): one params batch, one table, or
        consecutive metric batches merged up to MAX_BATCH values. A table goes only when
        no metrics or params are queued: its upload can take seconds on a loaded machine,
        and the metrics behind it (an evaluation's val_loss) are what a process ended right
        after its report must not lose."""
        if not self._queue:
            return None
        at = next((i for i, (kind, _) in enumerate(self._queue) if kind != "table"), 0)
        kind, items = self._queue[at]
        del self._queue[at]
        if kind == "metrics":
            items = list(items)
            while (at < len(self._queue) and self._queue[at][0] == "metrics"
                   and len(items) + len(self._queue[at][1]) <= MAX_BATCH):
                items.extend(self._queue[at][1])
                del self._queue[at]
            self._queued -= len(items)
        return kind, items

    def _run(self) -> None:
        delay, down_since = self._retry_s, None
        while not self._give_up.is_set():
            with self._cond:
                if self._in_flight is None:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    self._in_flight = self._take()
                    if self._in_flight is None:  # closing, and everything is sent
                        return
                kind, items = self._in_flight
                dropped = self._dropped
                if kind == "metrics" and dropped > self._dropped_logged:
                    items = [*items, Metric(DROPPED_METRIC, float(dropped),
                                            int(time.time() * 1000), self._last_step)]
            try:
                if kind == "params":
                    self._client.log_batch(self.run_id, params=items)
                elif kind == "table":
                    import pandas as pd

                    rows, artifact_file = items[0]
                    self._client.log_table(self.run_id, pd.DataFrame(rows), artifact_file)
                else:
                    self._client.log_batch(self.run_id, metrics=items)
            except Exception as e:  # whatever MLflow or the network raises: retry later
                with self._cond:
                    self._down = True
                    self._cond.notify_all()  # a drain() waiting now returns at once
                    if kind == "table":
                        self._table_failures += 1
                        if self._table_failures >= TABLE_ATTEMPTS:
                            logger.warning("MLflow table %s not logged after %d attempts "
                                           "(%s: %s); going on without it", items[0][1],
                                           TABLE_ATTEMPTS, type(e).__name__, str(e)[:300])
                            self._in_flight, self._table_failures = None, 0
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning("MLflow logging failed (%s: %s); training goes on with "
                                   "its metrics buffered", type(e).__name__, str(e)[:300])
                # Closing: retry at least every second until close's deadline.
                self._give_up.wait(min(delay, 1.0) if self._closing else delay)
                delay = min(delay * 2, self._max_retry_s)
                continue
            delay = self._retry_s
            with self._cond:
                self._table_failures = 0
                if kind == "metrics":
                    self._sent += len(self._in_flight[1])
                    self._dropped_logged = dropped
                self._in_flight = None
                self._outage_warned = self._down = False
                backlog = self._queued
                self._cond.notify_all()
            if down_since is not None:
                logger.warning("MLflow reachable again after %.0f s; sending %d buffered "
                               "metric values", time.monotonic() - down_since, backlog)
                down_since = None

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the metrics and params queued so far to reach MLflow,
        but not at all while MLflow is down; True when they have. For the points where the
        process may be ended right after (a report that lets ASHA stop the trial, which
        kills its workers and this daemon thread with them): normally milliseconds, and
        an outage still never holds the step loop."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._unsent_records() and not self._down:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return not self._unsent_records()

    def _unsent_records(self) -> bool:
        """Metrics or params queued or in flight (lock held). Tables, best effort and the
        slowest to send, are not waited for."""
        return any(kind != "table" for kind, _ in self._queue) or (
            self._in_flight is not None and self._in_flight[0] != "table")

    def close(self, deadline_s: float) -> BufferStats:
        """Send what is queued, waiting at most `deadline_s`; what is left then is given
        up on and counted as dropped (a warning says how much)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(deadline_s)
        self._give_up.set()
        with self._cond:
            left = self._queued + (len(self._in_flight[1]) if self._in_flight
                                   and self._in_flight[0] == "metrics" else 0)
            if left:
                logger.warning("MLflow still unreachable after %.0f s: %d metric values "
                               "not sent", deadline_s, left)
                self._dropped += left
                self._queue.clear()
                self._queued, self._in_flight = 0, None
            return BufferStats(self._sent, self._dropped)


def record_failure(tracker: RunTracker, error: BaseException, details: str,
                   status: str = "FAILED", curve: bool = False) -> None:
    """Mark `tracker`'s run ended by `error` (its message as the `lmforge.error` tag, the
    traceback `details` as error.txt, the loss curve when asked), as far as MLflow lets us.
    Never raises: the caller is handling `error` and re-raises it, and an MLflow outage
    must not replace the first error with its own."""
    steps = [lambda: tracker.set_tags({"lmforge.error": f"{type(error).__name__}: {error}"
                                       [:5000]}),
             lambda: tracker.log_text(details, "error.txt"),
             *([tracker.log_loss_curve] if curve else []),
             lambda: tracker.finish(status)]
    for step in steps:
        try:
            step()
        except Exception as e:
            logger.warning("could not record the %s run's error in MLflow (%s: %s)",
                           status, type(e).__name__, str(e)[:300])


__all__ = ["DROPPED_METRIC", "BufferStats", "RunTracker", "TrackingBuffer", "experiment_id",
           "flatten", "lineage_tags", "record_failure"]
