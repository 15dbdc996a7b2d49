"""Tune stage: Optuna (through Ray Tune's OptunaSearch) + ASHA over spec fields.

Each trial's driver function (`train_driver_fn`) applies the sampled values to the spec
and runs its own distributed `TorchTrainer`; `TuneReportCallback` forwards every
validation report to Tune, so ASHA can stop a bad trial at a rung. The search's MLflow
parent run and one child run per trial are addressed by (tracking URI, run id), never by
a process-global active run, so concurrent trials nest correctly.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Stopper
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from lmforge.config import Choice, IntRange, JobSpec, LogUniform, SearchDim, TuneConfig, Uniform
from lmforge.data import PreparedData
from lmforge.storage import require_shared
from lmforge.tracking import PARENT_TAG, RunTracker
from lmforge.train import ResumeError, run_exists, run_training
from lmforge.tune_snapshot import StateSnapshots, repair

STATE_FILE = "lmforge_search.json"
"""Written into the Tune experiment directory: the MLflow parent run a resume continues."""


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


# --- searcher, scheduler, budget -----------------------------------------------------


def objectives(cfg: TuneConfig) -> dict[str, str]:
    """Metric -> mode the searcher optimises: val_loss, plus tokens_per_s when multi-objective."""
    return {cfg.metric: "min"} | ({"tokens_per_s": "max"} if cfg.multi_objective else {})


def startup_trials(cfg: TuneConfig) -> int:
    """Random trials before TPE takes over (see `tune.startup_trials`)."""
    return cfg.startup_trials or min(10, max(2, cfg.num_trials // 3))


def make_searcher(cfg: TuneConfig) -> OptunaSearch:
    import optuna

    if cfg.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    else:  # multivariate: models the joint density (lr with warmup, say), not each alone
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True,
                                             n_startup_trials=startup_trials(cfg))
    goals = objectives(cfg)
    if len(goals) == 1:
        return OptunaSearch(metric=cfg.metric, mode="min", sampler=sampler)
    return OptunaSearch(metric=list(goals), mode=list(goals.values()), sampler=sampler)


def make_scheduler(spec: JobSpec) -> ASHAScheduler | FIFOScheduler:
    cfg = spec.tune
    if cfg.scheduler == "fifo" or cfg.multi_objective:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", metric=cfg.metric, mode="min", max_t=spec.train.steps,
                         grace_period=min(cfg.grace_period, spec.train.steps),
                         reduction_factor=cfg.reduction_factor)


class TokenBudget(Stopper):
    """Stops the whole search once its trials together have trained on `max_tokens`.

    Tune has wall-time (`time_budget_s`) and per-trial stoppers but no budget summed over
    trials, so this one is ours: it keeps each trial's latest `tokens` report.

    On `--resume` the count goes on: Tune pickles the stopper into every experiment-state
    snapshot, and a restored search runs with that copy (`TuneController.resume` replaces
    the `RunConfig.stop` from `tuner.pkl`, the empty one from the start), as it does for
    `time_budget_s`. A trial the kill interrupted continues its Train run from its latest
    checkpoint (see `train_driver_fn`), so its `tokens` go on from the count kept here.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.tokens[trial_id] = max(self.tokens.get(trial_id, 0), int(result.get("tokens", 0)))
        return False

    def stop_all(self) -> bool:
        return sum(self.tokens.values()) >= self.max_tokens


# --- one trial -----------------------------------------------------------------------


def train_driver_fn(config: dict[str, Any], spec: JobSpec, data: PreparedData,
                    parent: RunTracker | None, experiment_id: str,
                    run_tags: dict[str, str] | None = None) -> None:
    """One trial: the sampled values applied to the spec, trained by its own TorchTrainer.

    An invalid sample or a crash fails this trial only: its MLflow run is FAILED with the
    error as a tag and a traceback artifact, and Tune goes on with the next trial.
    """
    ctx = tune.get_context()
    trial_name = ctx.get_trial_name()
    name = f"{ctx.get_experiment_name()}-{trial_name}"
    # A resumed search starts the trials the kill interrupted again, from the top of this
    # function under the same name (Tune holds no checkpoint of theirs: TuneReportCallback
    # passes only the path). Their Train run is in storage: continue it, so the steps, and
    # the tokens TokenBudget has counted, are not trained again.
    resume = run_exists(spec.train.storage_path, name)
    tracker = None
    if parent is not None:
        tracker = RunTracker.start(parent.uri, experiment_id, trial_name, parent=parent, tags={
            **(run_tags or {}), "lmforge.trial_id": ctx.get_trial_id(),
            "lmforge.trial_dir": Path(ctx.get_trial_dir()).name})
        tracker.log_params(config)
    try:
        trial_spec = spec.with_values(config)
        if tracker is not None:
            tracker.log_dict(trial_spec.model_dump(mode="json"), "spec.yaml")
            with tracker.system_metrics(spec.tracking.system_metrics_interval_s):
                run_training(trial_spec, data, tracker, name=name,
                             callbacks=[TuneReportCallback()], resume=resume)
        else:
            run_training(trial_spec, data, None, name=name, callbacks=[TuneReportCallback()],
                         resume=resume)
    except Exception as e:
        if tracker is not None:
            tracker.set_tags({"lmforge.error": f"{type(e).__name__}: {e}"[:5000]})
            tracker.log_text(traceback.format_exc(), "error.txt")
            tracker.log_loss_curve()
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        tracker.log_loss_curve()
        tracker.finish()


# --- the search ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    status: str
    """FINISHED (ran train.steps), STOPPED (by ASHA or a budget) or FAILED."""
    steps: int
    val_loss: float
    best_val_loss: float
    tokens_per_s: float
    tokens: int
    checkpoint: str | None
    mlflow_run_id: str
    error: str | None


@dataclass(frozen=True)
class SearchOutcome:
    best: TrialOutcome
    trials: list[TrialOutcome]
    pareto: list[TrialOutcome] = field(default_factory=list)
    """Multi-objective only: the trials no other trial beats on both val_loss and tokens/s."""


def experiment_dir(spec: JobSpec, name: str) -> Path:
    return Path(spec.tune.storage_path).resolve() / name


def search_started(spec: JobSpec, name: str) -> bool:
    """Whether search `name` left state to restore (its MLflow parent run and Tune's)."""
    path = experiment_dir(spec, name)
    return bool(name) and (path / STATE_FILE).exists() and tune.Tuner.can_restore(str(path))


def resumable_name(spec: JobSpec, spec_stem: str) -> str:
    """The search `--resume` continues: `tracking.run_name` when that experiment exists,
    else the newest restorable search of this spec file under `tune.storage_path`."""
    root = Path(spec.tune.storage_path).resolve()
    name = spec.tracking.run_name or ""
    if not search_started(spec, name):
        found = sorted((p for p in root.glob(f"{spec_stem}-*") if search_started(spec, p.name)),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ResumeError(f"tune.storage_path {root}: no search named {name!r} or "
                              f"{spec_stem}-* to resume; start one with `lmforge tune` first")
        name = found[-1].name
    return name


# What `Tuner.restore` brings back from the experiment, whatever the spec says now. The
# rest of `tune` (enabled, storage_path, driver_cpus) is read afresh on a resume.
_RESTORED = ("num_trials", "max_tokens", "time_budget_s", "max_concurrent_trials", "metric",
             "multi_objective", "searcher", "scheduler", "search_space", "grace_period",
             "reduction_factor", "startup_trials", "seed")


def _search_settings(cfg: TuneConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", include=set(_RESTORED))


def check_settings_unchanged(spec: JobSpec, name: str) -> None:
    """A resumed search runs with the settings it started with (Tune restores its searcher,
    scheduler, budget and trial count): refuse a spec that asks for others rather than
    ignore it."""
    state = experiment_dir(spec, name) / STATE_FILE
    started = json.loads(state.read_text()).get("tune") if state.exists() else None
    if started is None:  # no state of ours (tracking off), or recorded by an older lmforge
        return
    now = _search_settings(spec.tune)
    changed = [f"tune.{key}: {started.get(key)!r} when it started, {now[key]!r} now"
               for key in _RESTORED if started.get(key) != now[key]]
    if changed:
        raise ResumeError(f"search {name!r} resumes with the settings it started with, and "
                          f"the spec changes them ({'; '.join(changed)}). Resume without "
                          "those changes, or start a new search (another tracking.run_name)")


def resume_state(spec: JobSpec, name: str) -> dict[str, Any]:
    """Parent run id, experiment id and tracking URI recorded when the search started."""
    return json.loads((experiment_dir(spec, name) / STATE_FILE).read_text())


def run_search(spec: JobSpec, data: PreparedData, parent: RunTracker | None,
               experiment_id: str, name: str, run_tags: dict[str, str] | None = None,
               resume: bool = False) -> SearchOutcome:
    cfg = spec.tune
    if not cfg.search_space:
        raise ValueError("tune.search_space: empty; name at least one spec field to search")
    check_fits(spec, ray.cluster_resources().get("CPU", 0))
    require_shared(cfg.storage_path, "tune.storage_path")  # multi-host needs shared storage
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, spec=spec, data=data, parent=parent,
                             experiment_id=experiment_id, run_tags=run_tags or {}),
        {"CPU": cfg.driver_cpus},
    )
    path = experiment_dir(spec, name)
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ResumeError(f"{path}: no Ray Tune experiment state to resume")
        if damaged := repair(path):
            print(f"[lmforge] {', '.join(damaged)} in {path} was cut short (the driver was "
                  "killed while writing it); resuming from the last intact copy of the "
                  "search's state", file=sys.stderr, flush=True)
        if parent is not None:
            close_orphaned_trials(parent)
        # Finished and errored trials keep their results; the searcher keeps its history
        # and the token budget its count; trials the killed driver left running start
        # again and continue their Train runs.
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        stop = TokenBudget(cfg.max_tokens) if cfg.max_tokens else None
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg.search_space),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(cfg),
                scheduler=make_scheduler(spec),
                num_samples=cfg.num_trials,
                max_concurrent_trials=cfg.max_concurrent_trials,
                time_budget_s=cfg.time_budget_s,
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(path.parent), stop=stop,
                                      callbacks=[StateSnapshots()], verbose=1),
        )
        if parent is not None:
            path.mkdir(parents=True, exist_ok=True)
            (path / STATE_FILE).write_text(json.dumps({
                "parent_run_id": parent.run_id, "experiment_id": experiment_id,
                "tracking_uri": parent.uri, "tune": _search_settings(cfg)}))
    grid = tuner.fit()
    runs = trial_runs(parent) if parent is not None else {}
    trials = [_outcome(r, runs, spec.train.steps) for r in grid]
    if parent is not None:
        _close_stopped_trials(parent.uri, trials)
    finished = [t for t in trials if t.error is None and t.checkpoint is not None]
    if not finished:
        errors = "; ".join(t.error or "no checkpoint" for t in trials)
        raise RuntimeError(f"every trial failed: {errors}")
    pareto = pareto_front(finished) if cfg.multi_objective else []
    best = min(finished, key=lambda t: t.best_val_loss)
    outcome = SearchOutcome(best=best, trials=trials, pareto=pareto)
    if parent is not None:
        log_search(parent, spec, outcome)
    return outcome


def pareto_front(trials: list[TrialOutcome]) -> list[TrialOutcome]:
    """Trials not dominated on (best_val_loss lower, tokens_per_s higher), by Optuna's own
    multi-objective `best_trials`."""
    study = _study(trials, {}, multi=True)
    return sorted((trials[t.number] for t in study.best_trials), key=lambda t: t.best_val_loss)


def trial_runs(parent: RunTracker) -> dict[str, Any]:
    """Trial directory name -> the newest child run of `parent` for it."""
    children = parent.client.search_runs(
        [parent.client.get_run(parent.run_id).info.experiment_id],
        filter_string=f"tags.{PARENT_TAG} = '{parent.run_id}'", max_results=10_000)
    runs: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        runs[run.data.tags.get("lmforge.trial_dir", "")] = run
    return runs


def close_orphaned_trials(parent: RunTracker) -> None:
    """Child runs a killed driver left RUNNING: their trials go on under new runs."""
    for run in trial_runs(parent).values():
        if run.info.status == "RUNNING":
            child = RunTracker(parent.uri, run.info.run_id)
            child.set_tags({"lmforge.note": "search driver killed; the resumed search "
                                            "continued this trial under a new run"})
            child.log_loss_curve()
            child.finish("KILLED")


def _close_stopped_trials(uri: str, trials: list[TrialOutcome]) -> None:
    """ASHA stops a trial at a rung, and also at max_t, its final report; a budget stops
    all: Tune interrupts the trial's driver and records no error. Give those MLflow runs a
    loss curve and an honest status: FINISHED when all steps ran, KILLED when stopped."""
    for trial in trials:
        if not trial.mlflow_run_id or trial.error is not None:
            continue
        tracker = RunTracker(uri, trial.mlflow_run_id)
        if tracker.status() != "FINISHED":
            tracker.log_loss_curve()
            tracker.finish("FINISHED" if trial.status == "FINISHED" else "KILLED")


def _outcome(result: tune.Result, runs: dict[str, Any], steps: int) -> TrialOutcome:
    m = result.metrics or {}
    run = runs.get(Path(result.path).name) if result.path else None
    done = int(m.get("step", 0))
    status = "FAILED" if result.error else "FINISHED" if done >= steps else "STOPPED"
    return TrialOutcome(
        trial_id=m.get("trial_id") or (run.data.tags.get("lmforge.trial_id", "") if run else ""),
        config=result.config or {},
        status=status,
        steps=done,
        val_loss=float(m.get("val_loss", math.nan)),
        best_val_loss=float(m.get("best_val_loss", math.inf)),
        tokens_per_s=float(m.get("tokens_per_s", 0.0)),
        tokens=int(m.get("tokens", 0)),
        checkpoint=_best_checkpoint_path(result),
        mlflow_run_id=m.get("mlflow_run_id") or (run.info.run_id if run else ""),
        error=f"{type(result.error).__name__}: {result.error}"[:2000] if result.error else None,
    )


def _best_checkpoint_path(result: tune.Result) -> str | None:
    """The trial's lowest-val_loss Train checkpoint (its path travels in the metrics)."""
    history = result.metrics_dataframe
    if history is None or "checkpoint_path" not in history or history.empty:
        return (result.metrics or {}).get("checkpoint_path")
    rows = history.dropna(subset=["checkpoint_path"])
    return str(rows.loc[rows["val_loss"].idxmin(), "checkpoint_path"]) if len(rows) else None


# --- what the parent run holds -------------------------------------------------------


def _study(trials: list[TrialOutcome], space: dict[str, SearchDim], multi: bool) -> Any:
    """The search as an Optuna study (one trial per Tune trial, in order), so Optuna's own
    Pareto front, importance and plotting functions apply to it."""
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )
    from optuna.trial import TrialState, create_trial

    def dist(dim: SearchDim) -> Any:
        match dim:
            case LogUniform(low=lo, high=hi):
                return FloatDistribution(lo, hi, log=True)
            case Uniform(low=lo, high=hi):
                return FloatDistribution(lo, hi)
            case IntRange(low=lo, high=hi):
                return IntDistribution(lo, hi)
            case Choice(values=values):
                return CategoricalDistribution([_primitive(v) for v in values])
        raise TypeError(dim)

    dists = {k: dist(d) for k, d in space.items()}
    study = optuna.create_study(directions=["minimize", "maximize"] if multi else ["minimize"])
    for t in trials:
        params = {k: _primitive(t.config[k]) for k in dists if k in t.config}
        failed = t.error is not None or not math.isfinite(t.best_val_loss)
        values = None if failed else (
            [t.best_val_loss, t.tokens_per_s] if multi else [t.best_val_loss])
        study.add_trial(create_trial(
            params=params, distributions={k: dists[k] for k in params}, values=values,
            state=TrialState.FAIL if failed else TrialState.COMPLETE,
            user_attrs={"status": t.status, "steps": t.steps, "mlflow_run_id": t.mlflow_run_id}))
    return study


def _primitive(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(
        value)


def log_search(parent: RunTracker, spec: JobSpec, outcome: SearchOutcome) -> None:
    """Trials table, search history and parameter-importance plots on the parent run."""
    cfg = spec.tune
    rows = [_row(t) for t in outcome.trials]
    parent.log_table(rows, "trials.json")
    parent.log_dict([asdict(t) for t in outcome.trials], "trials_full.json")
    if outcome.pareto:
        parent.log_dict([asdict(t) for t in outcome.pareto], "pareto.json")
    parent.log_metrics({"trials": len(outcome.trials),
                        "trials_failed": sum(t.status == "FAILED" for t in outcome.trials),
                        "trials_stopped": sum(t.status == "STOPPED" for t in outcome.trials),
                        "trial_steps_total": sum(t.steps for t in outcome.trials),
                        "best_val_loss": outcome.best.best_val_loss}, step=0)
    study = _study(outcome.trials, cfg.search_space, cfg.multi_objective)
    _log_plots(parent, study, cfg.multi_objective)


def _row(t: TrialOutcome) -> dict[str, Any]:
    return {"trial_id": t.trial_id, "status": t.status, "steps": t.steps,
            "best_val_loss": t.best_val_loss, "val_loss": t.val_loss,
            "tokens_per_s": round(t.tokens_per_s, 1), "tokens": t.tokens,
            **{k: _primitive(v) for k, v in t.config.items()},
            "mlflow_run_id": t.mlflow_run_id, "error": t.error or ""}


def _log_plots(parent: RunTracker, study: Any, multi: bool) -> None:
    """Optuna's matplotlib plots as PNGs. Importance needs two finished trials that differ;
    when a plot cannot be drawn the reason goes to plots_skipped.txt instead."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning

    target: dict[str, Any] = ({"target": lambda t: t.values[0], "target_name": "val_loss"}
                              if multi else {"target_name": "val_loss"})
    plots = {"search_history.png": lambda: ovm.plot_optimization_history(study, **target),
             "param_importances.png": lambda: ovm.plot_param_importances(study, **target)}
    if multi:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(
            study, target_names=["val_loss", "tokens_per_s"])
    skipped = []
    for file, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                ax = draw()
        except Exception as e:  # too few trials for importance, say
            skipped.append(f"{file}: {type(e).__name__}: {e}")
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        parent.log_figure(fig, file)
        plt.close(fig)
    if skipped:
        parent.log_text("\n".join(skipped) + "\n", "plots_skipped.txt")
