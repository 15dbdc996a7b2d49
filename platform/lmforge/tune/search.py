"""The search: the spec's search space as Optuna distributions, OptunaSearch (TPE or random)
with ASHA, a token budget summed over trials, and `run_search`, which runs the Tune
experiment (or resumes it) and returns each trial's outcome.

Each trial runs `trial.train_driver_fn`; what the search leaves in MLflow is `report.py`'s.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune
from ray.train import Checkpoint
from ray.tune import Stopper
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from lmforge.capacity import Demand, ensure_fits
from lmforge.config import JobSpec, TuneConfig
from lmforge.data import PreparedData
from lmforge.runs import NamedRun, ResumeError, RunState, require_shared_storage
from lmforge.storage import resolve
from lmforge.tracking import RunTracker
from lmforge.train.checkpoint import set_aside_reason
from lmforge.train.loop import StepHook
from lmforge.train.preempt import Preempted
from lmforge.train.trainer import hf_directory
from lmforge.tune.halving import SyncHalving
from lmforge.tune.preempt import SearchStop, lend, requested
from lmforge.tune.reaper import ReapTrainGroups, reap_train_groups
from lmforge.tune.report import (
    SearchOutcome,
    TrialOutcome,
    close_orphaned_trials,
    close_stopped_trials,
    log_search,
    pareto_front,
    trial_runs,
)
from lmforge.tune.snapshot import StateSnapshots, repair
from lmforge.tune.space import distributions
from lmforge.tune.trial import ranking_metric, rung_steps, train_driver_fn

# --- searcher, scheduler, budget -----------------------------------------------------


def objectives(cfg: TuneConfig) -> dict[str, str]:
    """Metric -> mode the searcher optimises: val_loss, plus tokens_per_s when multi-objective."""
    return {ranking_metric(cfg): "min"} | ({"tokens_per_s": "max"} if cfg.multi_objective
                                           else {})


def startup_trials(cfg: TuneConfig) -> int:
    """Random trials before TPE takes over (see `tune.startup_trials`)."""
    return cfg.startup_trials or min(10, max(2, cfg.num_trials // 3))


def make_searcher(cfg: TuneConfig) -> OptunaSearch:
    """OptunaSearch over `tune.search_space` (given as Optuna distributions, so Tune's
    param_space stays empty and the spec's space is translated in one place)."""
    import optuna

    if cfg.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    else:  # multivariate: models the joint density (lr with warmup, say), not each alone
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True,
                                             n_startup_trials=startup_trials(cfg))
    goals = objectives(cfg)
    space = distributions(cfg.search_space)
    if len(goals) == 1:
        return OptunaSearch(space, metric=ranking_metric(cfg), mode="min", sampler=sampler)
    return OptunaSearch(space, metric=list(goals), mode=list(goals.values()), sampler=sampler)


def make_scheduler(spec: JobSpec) -> ASHAScheduler | SyncHalving | FIFOScheduler:
    cfg = spec.tune
    if cfg.scheduler == "fifo" or cfg.multi_objective:
        return FIFOScheduler()
    # With cooldown rungs, the result at a rung carries the fork's loss as `search_loss`.
    if cfg.scheduler == "sha":
        return SyncHalving(ranking_metric(cfg), rung_steps(spec), cfg.reduction_factor,
                           cfg.num_trials, cfg.max_concurrent_trials)
    return ASHAScheduler(time_attr="step", metric=ranking_metric(cfg), mode="min",
                         max_t=spec.train.steps,
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


# --- the search ----------------------------------------------------------------------


# What `Tuner.restore` brings back from the experiment, whatever the spec says now. The
# rest of `tune` (enabled, storage_path, driver_cpus) is read afresh on a resume.
_RESTORED = ("num_trials", "max_tokens", "time_budget_s", "max_concurrent_trials", "metric",
             "multi_objective", "searcher", "scheduler", "search_space", "grace_period",
             "reduction_factor", "startup_trials", "seed", "rung_cooldown")


def search_settings(cfg: TuneConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", include=set(_RESTORED))


def check_settings_unchanged(spec: JobSpec, recorded: RunState, name: str) -> None:
    """A resumed search runs with the settings it started with (Tune restores its searcher,
    scheduler, budget and trial count): refuse a spec that asks for others rather than
    ignore it."""
    started = recorded.settings
    if not started:  # recorded by an older lmforge
        return
    now = search_settings(spec.tune)
    changed = [f"tune.{key}: {started.get(key)!r} when it started, {now[key]!r} now"
               for key in _RESTORED if started.get(key) != now[key]]
    if changed:
        raise ResumeError(f"search {name!r} resumes with the settings it started with, and "
                          f"the spec changes them ({'; '.join(changed)}). Resume without "
                          "those changes, or start a new search (another tracking.run_name)")


def run_search(spec: JobSpec, data: PreparedData, parent: RunTracker | None,
               experiment_id: str, name: str, run_tags: dict[str, str] | None = None,
               resume: bool = False, step_hook: StepHook | None = None) -> SearchOutcome:
    """Run the search `name` under `tune.storage_path` (or, with `resume`, continue it from
    Tune's state there) and return every trial's outcome and the best. `step_hook` goes to
    every trial's workers (`run_training`).

    SIGTERM to this process (in its main thread) while the search runs makes every running
    trial checkpoint and the search save its state, and this raise `Preempted`; `resume`
    continues it (`lmforge.tune.preempt`)."""
    cfg = spec.tune
    if not cfg.search_space:
        raise ValueError("tune.search_space: empty; name at least one spec field to search")
    # Also checked by `pipeline.execute` before the run opens; here for direct callers.
    ensure_fits(Demand.of(spec, search=True), spec.train.scheduling_timeout_s)
    require_shared_storage(spec, search=True)  # a multi-host search needs shared paths
    with lend(name) as stop_flag:
        trainable = tune.with_resources(
            tune.with_parameters(train_driver_fn, spec=spec, data=data, parent=parent,
                                 experiment_id=experiment_id, run_tags=run_tags or {},
                                 step_hook=step_hook, stop_flag=stop_flag),
            {"CPU": cfg.driver_cpus},
        )
        grid = _tuner(spec, name, trainable, parent, resume).fit()
        stopped = requested(stop_flag)
    # The last trials' controllers die after Tune has ended their actors, and may leave
    # their workers' placement groups reserved for the next search or run to wait on.
    reap_train_groups()
    if stopped is not None:
        steps = ", ".join(f"{trial} after step {step}" for trial, step in sorted(stopped.items()))
        raise Preempted(max(stopped.values(), default=0),
                        f"search {name!r} stopped by SIGTERM, its state saved with "
                        f"{len(stopped)} running trial(s) checkpointed ({steps or 'none'}): "
                        "the same command with --resume continues them")
    runs = trial_runs(parent) if parent is not None else {}
    # Trials report their checkpoints' paths inside train.storage_path's filesystem.
    train_storage = resolve(spec.train.storage_path, "train.storage_path")
    trials = [_outcome(r, runs, spec.train.steps, train_storage.fs) for r in grid]
    if parent is not None:
        close_stopped_trials(parent.uri, trials)
    if warning := unfinished_bracket(spec, trials):
        print(warning, file=sys.stderr, flush=True)
    finished = [t for t in trials if t.error is None and t.checkpoint is not None]
    if not finished:
        errors = "; ".join(t.error or "no checkpoint" for t in trials)
        raise RuntimeError(f"every trial failed: {errors}")
    pareto = pareto_front(finished) if cfg.multi_objective else []
    best = min(finished, key=lambda t: t.best_val_loss)
    # The best checkpoint as a local Hugging Face directory (downloaded from an object
    # store, FSDP shards gathered): what registering it needs.
    best = dataclasses.replace(best, checkpoint=hf_directory(
        Checkpoint(best.checkpoint, filesystem=train_storage.fs),
        parent.uri if parent is not None else None))
    outcome = SearchOutcome(best=best, trials=trials, pareto=pareto)
    if parent is not None:
        log_search(parent, spec, outcome)
    return outcome


def _tuner(spec: JobSpec, name: str, trainable: Any, parent: RunTracker | None,
           resume: bool) -> tune.Tuner:
    """A new Tuner for search `name`, or with `resume` the one restored from its state."""
    cfg = spec.tune
    experiment = NamedRun(name, cfg.storage_path, search=True).storage
    path, where = experiment.uri, experiment.ray_storage()
    if not resume:
        stop = TokenBudget(cfg.max_tokens) if cfg.max_tokens else None
        scheduler, searcher = make_scheduler(spec), make_searcher(cfg)
        sync = isinstance(scheduler, SyncHalving)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                # SyncHalving's trials pause at rungs: Tune's own limit would count them
                search_alg=scheduler.limit(searcher) if sync else searcher,
                scheduler=scheduler,
                num_samples=cfg.num_trials,
                max_concurrent_trials=None if sync else cfg.max_concurrent_trials,
                time_budget_s=cfg.time_budget_s,
            ),
            # The callbacks go into tuner.pkl and come back with a restore.
            run_config=tune.RunConfig(name=name, stop=stop,
                                      callbacks=[StateSnapshots(), SearchStop(name),
                                                 ReapTrainGroups()],
                                      verbose=1,
                                      **resolve(cfg.storage_path, "tune.storage_path")
                                      .ray_storage()),
        )
    if not tune.Tuner.can_restore(where["storage_path"],
                                  storage_filesystem=where["storage_filesystem"]):
        raise ResumeError(f"{path}: no Ray Tune experiment state to resume")
    # A driver killed while Tune wrote its state (or, in an object store, while it uploaded
    # a file it was rewriting) leaves a file cut short: put the last intact set back.
    if damaged := repair(experiment.fs, experiment.path):
        print(f"[lmforge] {', '.join(damaged)} in {path} was cut short (the driver was "
              "killed while writing it); resuming from the last intact copy of the "
              "search's state", file=sys.stderr, flush=True)
    if parent is not None:
        close_orphaned_trials(parent, ended_trials(where["storage_path"],
                                                   where["storage_filesystem"]))
    # Finished and errored trials keep their results; the searcher keeps its history and
    # the token budget its count; trials the killed (or SIGTERMed) driver left running
    # start again and continue their Train runs.
    return tune.Tuner.restore(where["storage_path"], trainable, resume_unfinished=True,
                              resume_errored=False,
                              storage_filesystem=where["storage_filesystem"])


def unfinished_bracket(spec: JobSpec, trials: list[TrialOutcome]) -> str | None:
    """Under `scheduler: sha`, a search whose budget ended before its bracket passed every
    rung has no trial at `train.steps`, and its best is an early rung's: say so, and how to
    size the search (measured: a bracket of 16 had not passed its second rung when the
    shipped 30-minute search's budget ended, on 2 cores). Not when every trial failed:
    that is an error of its own."""
    cfg, ran = spec.tune, [t for t in trials if t.error is None]
    if cfg.scheduler != "sha" or cfg.multi_objective or not ran or any(
            t.status == "FINISHED" for t in ran):
        return None
    furthest = max(t.steps for t in ran)
    return (f"[lmforge] tune.scheduler sha: no trial reached train.steps "
            f"({spec.train.steps}); the furthest stopped at step {furthest}. The search ended "
            f"(tune.time_budget_s or tune.max_tokens) before its bracket of tune.num_trials "
            f"({cfg.num_trials}) trials had passed every rung, so its best trial is one "
            f"stopped early. Lower tune.num_trials or raise the budget: every trial trains to "
            f"the first rung before any goes on (docs/tuning.md#synchronous-halving)")


def ended_trials(path: str, fs: pyarrow.fs.FileSystem | None) -> set[str]:
    """The directory names of the trials a saved search has ended (TERMINATED: finished
    or stopped by the scheduler; ERROR): `Tuner.restore` does not run them again."""
    try:
        analysis = tune.ExperimentAnalysis(path, storage_filesystem=fs)
    except Exception as e:  # Tuner.restore reads it again, and says what is wrong
        print(f"[lmforge] could not read which trials the search had ended ({e}); their "
              "MLflow runs are closed as continued", file=sys.stderr, flush=True)
        return set()
    return {Path(t.path).name for t in analysis.trials
            if t.status in (Trial.TERMINATED, Trial.ERROR)}


def _outcome(result: tune.Result, runs: dict[str, Any], steps: int,
             fs: pyarrow.fs.FileSystem) -> TrialOutcome:
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
        cooldown_steps=int(m.get("cooldown_steps", 0)),
        checkpoint=_best_checkpoint_path(result, fs),
        mlflow_run_id=m.get("mlflow_run_id") or (run.info.run_id if run else ""),
        error=f"{type(result.error).__name__}: {result.error}"[:2000] if result.error else None,
    )


def _best_checkpoint_path(result: tune.Result, fs: pyarrow.fs.FileSystem) -> str | None:
    """The trial's lowest-val_loss Train checkpoint (its path travels in the metrics), not
    one set aside because it failed to load."""
    history = result.metrics_dataframe
    if history is None or "checkpoint_path" not in history or history.empty:
        return (result.metrics or {}).get("checkpoint_path")
    rows = history.dropna(subset=["checkpoint_path"]).sort_values("val_loss")
    return next((str(p) for p in rows["checkpoint_path"]
                 if set_aside_reason(Checkpoint(str(p), filesystem=fs)) is None), None)


