"""A search against a real `mlflow server`: concurrent trials nest under one parent run, a
failing trial is recorded and the search goes on, the best trial becomes `candidate`, the
promotion gate makes it `champion`, and MLflow's own API loads it by alias and generates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lmforge.capacity import ResourceError
from lmforge.pipeline import Stages, execute
from lmforge.tune import run_search


@pytest.mark.long  # a search of concurrent trials on an `mlflow server`: minutes (`make test-long`)
def test_concurrent_search_on_mlflow_server(ray_cluster, tiny_spec, tmp_path: Path,
                                            mlflow_server: str):
    spec = tiny_spec(
        f"tracking.uri={mlflow_server}", "tracking.system_metrics_interval_s=1",
        # Two 1-worker trials side by side fill the 2-CPU cluster.
        "train.workers=1", "tune.max_concurrent_trials=2", "tune.num_trials=4",
        # n_head=3 does not divide n_embd: those trials fail, the search goes on. All four
        # trials are TPE's seeded random start-up samples, and the fourth has n_head=3.
        "tune.search_space.model.n_head={type: choice, values: [2, 3]}",
        "tune.startup_trials=4")
    summary = execute(spec, Stages(search=True, register=True, serve_check=False),
                      runs_dir=tmp_path)
    assert summary.tracking_uri == mlflow_server
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert "mlflow.source.git.commit" in parent.data.tags
    assert "ray" in json.loads(parent.data.tags["lmforge.versions"])
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "search_history.png", "param_importances.png", "spec.yaml",
            "tokenizer"} <= parent_files, parent_files
    assert any(k.startswith("system/cpu") for k in parent.data.metrics)

    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 == summary.trials
    failed = [c for c in children if c.info.status == "FAILED"]
    good = [c for c in children if c.info.status != "FAILED"]
    assert failed and len(good) >= 2, [c.data.params for c in children]
    assert summary.trials_failed == len(failed)
    for child in failed:
        assert child.data.params["model.n_head"] == "3"
        assert "n_head" in child.data.tags["lmforge.error"]
    for child in good:
        assert child.info.status in {"FINISHED", "KILLED"}
        assert child.data.tags["lmforge.data_fingerprint"] == summary.data_fingerprint
        assert "mlflow.source.git.commit" in child.data.tags
        assert "val_loss" in child.data.metrics
        assert any(k.startswith("system/cpu") for k in child.data.metrics)
        assert {"spec.yaml", "loss_curve.png"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)}
    # Nested correctly while running concurrently: two trial runs overlapped in time.
    spans = sorted((c.info.start_time, c.info.end_time) for c in good)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans

    # Registered as candidate with lineage; the gate (no champion yet) promoted it.
    name = "lmforge-tiny"
    candidate = client.get_model_version_by_alias(name, "candidate")
    assert int(candidate.version) == summary.registered_version
    assert candidate.run_id == summary.best_trial_run_id
    assert candidate.tags["lmforge.data_fingerprint"] == summary.data_fingerprint
    assert json.loads(candidate.tags["lmforge.spec"])["tune"]["max_concurrent_trials"] == 2
    assert float(candidate.tags["lmforge.best_val_loss"]) == pytest.approx(
        summary.best_val_loss)
    assert candidate.tags["lmforge.gate.decision"] == "promoted"
    assert client.get_model_version_by_alias(name, "champion").version == candidate.version
    assert summary.model_uri == f"models:/{name}@champion"

    mlflow.set_tracking_uri(mlflow_server)
    pipe = mlflow.transformers.load_model(f"models:/{name}@champion")
    text = pipe("The ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("The ") and len(text) > len("The ")
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    assert isinstance(pyfunc.predict(["def "])[0], str)


def test_infeasible_trial_fails_before_any_trial_starts(ray_cluster, tiny_spec, tmp_path):
    spec = tiny_spec("train.workers=3", "train.cpus_per_worker=1")
    start = time.monotonic()
    with pytest.raises(ResourceError, match=r"one trial needs 3.1 CPUs .* cluster has 2"):
        run_search(spec, data=None, parent=None, experiment_id="", name="infeasible")
    assert time.monotonic() - start < 10
    assert not (Path(spec.tune.storage_path) / "infeasible").exists()
