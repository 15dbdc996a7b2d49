"""MLflow runs, addressed explicitly by (tracking URI, run id).

`RunTracker` holds two strings, so it pickles to Ray workers on any node, and every call
goes through an `MlflowClient` for that URI: no process-global active run, so concurrent
trials cannot cross their metrics, and no working directory is assumed. Only world rank 0
of a training run logs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"


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


__all__ = ["RunTracker", "experiment_id", "flatten", "lineage_tags"]
