"""One trial of a search: the sampled values applied to the spec, trained by its own
distributed `TorchTrainer`, each validation report forwarded to Tune (so ASHA can stop the
trial at a rung) and logged to the trial's MLflow run, a child of the search's."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from lmforge.config import JobSpec
from lmforge.data import PreparedData
from lmforge.tracking import RunTracker, record_failure
from lmforge.train import run_training
from lmforge.train.loop import StepHook


def train_driver_fn(config: dict[str, Any], spec: JobSpec, data: PreparedData,
                    parent: RunTracker | None, experiment_id: str,
                    run_tags: dict[str, str] | None = None,
                    step_hook: StepHook | None = None) -> None:
    """One trial (Tune's function trainable; it runs in its own resource bundle).

    An invalid sample or a crash fails this trial only: its MLflow run is FAILED with the
    error as a tag and a traceback artifact, and Tune goes on with the next trial.

    A resumed search starts the trials the kill interrupted again, from the top of this
    function under the same name (Tune holds no checkpoint of theirs: TuneReportCallback
    passes only the path). Ray Train finds their run in storage and continues it from its
    latest checkpoint, so the steps, and the tokens TokenBudget has counted, are not
    trained again.
    """
    ctx = tune.get_context()
    trial_name = ctx.get_trial_name()
    name = f"{ctx.get_experiment_name()}-{trial_name}"
    tracker = None
    if parent is not None:
        tracker = RunTracker.start(parent.uri, experiment_id, trial_name, parent=parent, tags={
            **(run_tags or {}), "lmforge.trial_id": ctx.get_trial_id(),
            "lmforge.trial_dir": Path(ctx.get_trial_dir()).name})
        tracker.log_params(config)
    try:
        trial_spec = spec.with_values(config)
        metrics = contextlib.nullcontext()
        if tracker is not None:
            tracker.log_dict(trial_spec.model_dump(mode="json"), "spec.yaml")
            metrics = tracker.system_metrics(spec.tracking.system_metrics_interval_s)
        with metrics:
            run_training(trial_spec, data, tracker, name=name,
                         callbacks=[TuneReportCallback()], step_hook=step_hook)
    except Exception as e:
        if tracker is not None:  # never raises: an MLflow outage must not hide `e`
            record_failure(tracker, e, traceback.format_exc(), curve=True)
        raise
    if tracker is not None:
        tracker.log_loss_curve()
        tracker.finish()
