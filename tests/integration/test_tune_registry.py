"""A 2-trial search registers its best trial as `champion`, which MLflow's own API loads."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from lmforge.pipeline import Stages, execute


def test_search_registers_champion_that_mlflow_loads(ray_cluster, tiny_spec, tmp_path: Path):
    spec = tiny_spec()
    summary = execute(spec, Stages(search=True, register=True, serve_check=False),
                      runs_dir=tmp_path)
    uri = summary["tracking_uri"]
    client = MlflowClient(uri)

    assert summary["trials"] == 2
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    assert summary["best_trial_run_id"] in {c.info.run_id for c in children}
    for child in children:
        assert {"train.lr", "model.n_embd"} <= child.data.params.keys()
        assert "val_loss" in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"spec.yaml", "loss_curve.png"} <= artifacts
        # FINISHED when it ran all steps, KILLED when ASHA stopped it at a rung.
        assert child.info.status in {"FINISHED", "KILLED"}
    assert "FINISHED" in {c.info.status for c in children}  # ASHA lets one run to max_t

    version = client.get_model_version_by_alias("lmforge-tiny", "champion")
    assert int(version.version) == summary["registered_version"]
    assert version.run_id == summary["best_trial_run_id"]
    assert version.tags["lmforge.data_fingerprint"] == summary["data_fingerprint"]

    mlflow.set_tracking_uri(uri)
    pipe = mlflow.transformers.load_model("models:/lmforge-tiny@champion")
    text = pipe("The ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("The ") and len(text) > len("The ")
    pyfunc = mlflow.pyfunc.load_model("models:/lmforge-tiny@champion")
    assert isinstance(pyfunc.predict(["def "])[0], str)
