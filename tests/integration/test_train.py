"""2-worker DDP training on a real local Ray cluster lowers validation loss."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.pipeline import Stages, execute
from lmforge.tracking import RunTracker


def test_two_worker_training_lowers_validation_loss(ray_cluster, tiny_spec, tmp_path: Path):
    spec = tiny_spec()
    summary = execute(spec, Stages(search=False, register=False, serve_check=False),
                      runs_dir=tmp_path)

    run = RunTracker(summary["tracking_uri"], summary["mlflow_run_id"])
    val = sorted(run.metric_history("val_loss"))
    assert [step for step, _ in val] == [20, 40, 60]
    assert val[-1][1] < val[0][1] - 0.1, val
    assert summary["steps"] == 60
    assert summary["val_loss"] == val[-1][1]
    assert summary["tokens_per_s"] > 0

    # The kept checkpoint is a Hugging Face directory with safetensors weights, no pickle.
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    assert (ckpt / "tokenizer.json").exists()
    assert not list(ckpt.glob("*.bin"))

    written = json.loads((tmp_path / spec.tracking.run_name / "summary.json").read_text())
    assert written["mlflow_run_id"] == summary["mlflow_run_id"]

    artifacts = {a.path for a in run.client.list_artifacts(run.run_id)}
    assert {"loss_curve.png", "spec.yaml", "tokenizer"} <= artifacts
    params = run.client.get_run(run.run_id).data.params
    assert params["train.workers"] == "2" and params["model.n_layer"] == "1"
    assert int(params["model.parameters"]) > 10_000  # counted by rank 0 on the real model
