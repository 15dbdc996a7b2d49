"""Tune stage: Optuna TPE (through Ray Tune's OptunaSearch) + ASHA over spec fields.

Each trial's driver function (`train_driver_fn`) applies the sampled values to the spec
and runs its own distributed `TorchTrainer`; `TuneReportCallback` forwards every
validation report to Tune, so ASHA can stop a bad trial at a rung.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from lmforge.config import Choice, IntRange, JobSpec, LogUniform, SearchDim, Uniform
from lmforge.data import PreparedData
from lmforge.storage import require_shared
from lmforge.tracking import RunTracker
from lmforge.train import run_training


class ResourceError(RuntimeError):
    """The cluster can never run one trial; raised before any trial starts."""


def search_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """Spec distributions as Ray Tune domains (which OptunaSearch converts for Optuna)."""
    def domain(dim: SearchDim) -> Any:
        match dim:
            case LogUniform(low=lo, high=hi):
                return tune.loguniform(lo, hi)
            case Uniform(low=lo, high=hi):
                return tune.uniform(lo, hi)
            case IntRange(low=lo, high=hi):
                return tune.randint(lo, hi + 1)  # randint's upper bound is exclusive
            case Choice(values=values):
                return tune.choice(values)
        raise TypeError(dim)

    return {key: domain(dim) for key, dim in space.items()}


def trial_resources(spec: JobSpec) -> float:
    """CPUs one trial holds: its driver function's bundle plus its training workers."""
    return spec.tune.driver_cpus + spec.train.workers * spec.train.cpus_per_worker


def check_fits(spec: JobSpec, cluster_cpus: float) -> None:
    """Fail at once when a trial can never be scheduled, instead of pending forever."""
    need = trial_resources(spec)
    if need > cluster_cpus + 1e-9:
        raise ResourceError(
            f"one trial needs {need:g} CPUs (tune.driver_cpus {spec.tune.driver_cpus:g} + "
            f"train.workers {spec.train.workers} x train.cpus_per_worker "
            f"{spec.train.cpus_per_worker:g}) but the cluster has {cluster_cpus:g}; lower "
            f"train.workers or train.cpus_per_worker"
        )
    if spec.train.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if spec.train.workers > gpus:
            raise ResourceError(f"train.workers={spec.train.workers} with train.use_gpu needs "
                                f"{spec.train.workers} GPUs; the cluster has {gpus:g}")


def train_driver_fn(config: dict[str, Any], spec: JobSpec, data: PreparedData,
                    parent: RunTracker | None, experiment_id: str) -> None:
    """One trial: the sampled values applied to the spec, trained by its own TorchTrainer."""
    ctx = tune.get_context()
    trial_spec = spec.with_values(config)
    trial_name = ctx.get_trial_name()
    tracker = None
    if parent is not None:
        tracker = RunTracker.start(parent.uri, experiment_id, trial_name, parent=parent,
                                   tags={"lmforge.trial_id": ctx.get_trial_id()})
        tracker.log_params(config)
        tracker.log_dict(trial_spec.model_dump(mode="json"), "spec.yaml")
    try:
        run_training(trial_spec, data, tracker, name=f"{ctx.get_experiment_name()}-{trial_name}",
                     callbacks=[TuneReportCallback()])
    except BaseException:
        # A real failure, or ASHA stopping the trial; run_search tells them apart.
        if tracker is not None:
            tracker.log_loss_curve()
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        tracker.log_loss_curve()
        tracker.finish()


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    steps: int
    val_loss: float
    best_val_loss: float
    tokens_per_s: float
    checkpoint: str | None
    mlflow_run_id: str
    error: str | None


@dataclass(frozen=True)
class SearchOutcome:
    best: TrialOutcome
    trials: list[TrialOutcome]


def run_search(spec: JobSpec, data: PreparedData, parent: RunTracker | None,
               experiment_id: str, name: str) -> SearchOutcome:
    cfg = spec.tune
    if not cfg.search_space:
        raise ValueError("tune.search_space: empty; name at least one spec field to search")
    check_fits(spec, ray.cluster_resources().get("CPU", 0))
    require_shared(cfg.storage_path, "tune.storage_path")  # multi-host needs shared storage
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, spec=spec, data=data, parent=parent,
                             experiment_id=experiment_id),
        {"CPU": cfg.driver_cpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg.search_space),
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric=cfg.metric, mode="min", seed=cfg.seed),
            scheduler=ASHAScheduler(
                time_attr="step", metric=cfg.metric, mode="min", max_t=spec.train.steps,
                grace_period=min(cfg.grace_period, spec.train.steps),
                reduction_factor=cfg.reduction_factor,
            ),
            num_samples=cfg.num_trials,
            max_concurrent_trials=cfg.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(cfg.storage_path).resolve()),
                                  verbose=1),
    )
    grid = tuner.fit()
    trials = [_outcome(r) for r in grid]
    if parent is not None:
        _close_stopped_trials(parent.uri, trials, spec.train.steps)
    finished = [t for t in trials if t.error is None and t.checkpoint is not None]
    if not finished:
        errors = "; ".join(t.error or "no checkpoint" for t in trials)
        raise RuntimeError(f"every trial failed: {errors}")
    best = min(finished, key=lambda t: t.best_val_loss)
    return SearchOutcome(best=best, trials=trials)


def _close_stopped_trials(uri: str, trials: list[TrialOutcome], steps: int) -> None:
    """ASHA stops a trial at a rung, and also at max_t, its final report: Tune interrupts
    the trial's driver either way and records no error. Give those MLflow runs a loss curve
    and an honest status: FINISHED when all `steps` ran, KILLED when stopped early."""
    for trial in trials:
        if not trial.mlflow_run_id or trial.error is not None:
            continue
        tracker = RunTracker(uri, trial.mlflow_run_id)
        if tracker.status() != "FINISHED":
            tracker.log_loss_curve()
            tracker.finish("FINISHED" if trial.steps >= steps else "KILLED")


def _outcome(result: tune.Result) -> TrialOutcome:
    m = result.metrics or {}
    return TrialOutcome(
        trial_id=m.get("trial_id", ""),
        config=result.config or {},
        steps=int(m.get("step", 0)),
        val_loss=float(m.get("val_loss", float("nan"))),
        best_val_loss=float(m.get("best_val_loss", float("inf"))),
        tokens_per_s=float(m.get("tokens_per_s", 0.0)),
        checkpoint=_best_checkpoint_path(result),
        mlflow_run_id=m.get("mlflow_run_id", ""),
        error=repr(result.error) if result.error else None,
    )


def _best_checkpoint_path(result: tune.Result) -> str | None:
    """The trial's lowest-val_loss Train checkpoint (its path travels in the metrics)."""
    history = result.metrics_dataframe
    if history is None or "checkpoint_path" not in history or history.empty:
        return (result.metrics or {}).get("checkpoint_path")
    rows = history.dropna(subset=["checkpoint_path"])
    return str(rows.loc[rows["val_loss"].idxmin(), "checkpoint_path"]) if len(rows) else None
