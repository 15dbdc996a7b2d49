"""What a search produced, and what its MLflow parent run holds of it: each trial's
outcome, the trials table, the Pareto front (multi-objective), Optuna's history and
importance plots, and honest statuses on the trials' own runs."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.config import JobSpec, SearchDim
from lmforge.tracking import PARENT_TAG, RunTracker
from lmforge.tune.space import distributions


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
    cooldown_steps: int = 0
    """Steps trained in cooldown forks at rungs (`tune.rung_cooldown`), besides `steps`."""


@dataclass(frozen=True)
class SearchOutcome:
    best: TrialOutcome
    trials: list[TrialOutcome]
    pareto: list[TrialOutcome] = field(default_factory=list)
    """Multi-objective only: the trials no other trial beats on both val_loss and tokens/s."""

    @property
    def steps_total(self) -> int:
        """Optimizer steps the search trained: every trial's, cooldown forks included."""
        return sum(t.steps + t.cooldown_steps for t in self.trials)



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


def paused_run(parent: RunTracker, trial_dir: str) -> RunTracker | None:
    """The trial's run, when it is still RUNNING as a trial starting again finds it: a
    synchronous rung paused the trial (its actor ended, its run left open) and has now
    promoted it, so its curve goes on in the same run. After a killed driver's
    `--resume` there is none: `close_orphaned_trials` has closed those runs first."""
    run = trial_runs(parent).get(trial_dir)
    if run is None or run.info.status != "RUNNING":
        return None
    return RunTracker(parent.uri, run.info.run_id)


def close_orphaned_trials(parent: RunTracker, ended: set[str]) -> None:
    """Child runs a killed driver left RUNNING whose trials the resumed search runs again:
    those go on under new runs. Trials Tune had already ended (`ended`: their trial
    directories; stopped by ASHA, at a rung or at max_t, before the driver closed their
    runs) are not run again: their runs stay for `close_stopped_trials` to close with the
    status their outcome earns, when the resumed search ends."""
    for trial_dir, run in trial_runs(parent).items():
        if run.info.status == "RUNNING" and trial_dir not in ended:
            child = RunTracker(parent.uri, run.info.run_id)
            child.set_tags({"lmforge.note": "search driver killed; the resumed search "
                                            "continued this trial under a new run"})
            child.log_loss_curve()
            child.finish("KILLED")


def close_stopped_trials(uri: str, trials: list[TrialOutcome]) -> None:
    """ASHA stops a trial at a rung, and also at max_t, its final report; a budget stops
    all: Tune interrupts the trial's driver and records no error. Give those MLflow runs a
    loss curve and an honest status: FINISHED when all steps ran, KILLED when stopped."""
    for trial in trials:
        if not trial.mlflow_run_id or trial.error is not None:
            continue
        tracker = RunTracker(uri, trial.mlflow_run_id)
        if tracker.status() != "FINISHED":
            _record_last_evaluation(tracker, trial)
            tracker.log_loss_curve()
            tracker.finish("FINISHED" if trial.status == "FINISHED" else "KILLED")


def _record_last_evaluation(tracker: RunTracker, trial: TrialOutcome) -> None:
    """The evaluation Tune stopped `trial` on, in its run when the trial's own logging did
    not get it there: rank 0 sends its metrics in the background (`TrackingBuffer`, which
    waits at most `DRAIN_S` before each report), and Tune ends the workers right after the
    report that stops the trial. On a loaded machine that report came first, and a stopped
    trial's run had no `val_loss` at all (seen in `make test`)."""
    if trial.steps <= 0 or not math.isfinite(trial.val_loss):
        return
    if any(step == trial.steps for step, _ in tracker.metric_history("val_loss")):
        return
    tracker.log_metrics({"val_loss": trial.val_loss,
                         "val_ppl": math.exp(min(trial.val_loss, 50))}, step=trial.steps)




def _study(trials: list[TrialOutcome], space: dict[str, SearchDim], multi: bool) -> Any:
    """The search as an Optuna study (one trial per Tune trial, in order), so Optuna's own
    Pareto front, importance and plotting functions apply to it."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    # Optuna's plots want categories it can print: a choice of lists is recorded as JSON.
    dists = {k: CategoricalDistribution([_primitive(v) for v in d.choices])
             if isinstance(d, CategoricalDistribution) else d
             for k, d in distributions(space).items()}
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
                        "trial_steps_total": outcome.steps_total,
                        "best_val_loss": outcome.best.best_val_loss}, step=0)
    study = _study(outcome.trials, cfg.search_space, cfg.multi_objective)
    _log_plots(parent, study, cfg.multi_objective)


def _row(t: TrialOutcome) -> dict[str, Any]:
    return {"trial_id": t.trial_id, "status": t.status, "steps": t.steps,
            "cooldown_steps": t.cooldown_steps,
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
