"""One trial of a search: the sampled values applied to the spec, trained by its own
distributed `TorchTrainer`, each validation report forwarded to Tune (so ASHA can stop the
trial at a rung) and logged to the trial's MLflow run, a child of the search's."""

from __future__ import annotations

import contextlib
import math
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from lmforge.config import JobSpec, TuneConfig
from lmforge.data import PreparedData
from lmforge.tracking import RunTracker, record_failure
from lmforge.train import Paused, Preempted, run_training
from lmforge.train.fork import SEARCH_METRIC, CooldownRungs
from lmforge.train.loop import StepHook
from lmforge.train.trainer import Deadline
from lmforge.tune.report import paused_run

T = TypeVar("T")
ABORT_GRACE_S = 2.0


class TrialTimeout(RuntimeError):
    """A trial ran past `tune.trial_timeout_s`."""


class ReportToTune(TuneReportCallback):
    """Ray's TuneReportCallback, less two reports: a preemption's (that checkpoint was not
    evaluated and its val_loss is a placeholder, which ASHA would take for the trial's
    worst result at a rung and the searcher would learn from), and a pause's, which the
    trial sends itself once its Train run has ended (`train_driver_fn`)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        if metrics and (metrics[0].get("preempted") or metrics[0].get("pausing")):
            return
        super().after_report(run_context, metrics, checkpoint)


def rung_steps(spec: JobSpec) -> list[int]:
    """ASHA's milestones below `train.steps`: grace_period * reduction_factor^k, computed
    as Ray's `_Bracket` does (a unit test holds the two together)."""
    cfg, max_t = spec.tune, spec.train.steps
    grace = min(cfg.grace_period, max_t)
    count = int(math.log(max_t / grace) / math.log(cfg.reduction_factor) + 1)
    return [r for k in range(count) if (r := grace * cfg.reduction_factor ** k) < max_t]


def cooldown_rungs(spec: JobSpec) -> CooldownRungs | None:
    """Where each trial forks a cooldown (`tune.rung_cooldown`), or None. With
    `scheduler: fifo` too: the forks are then recorded, stopping nothing (what
    `bench/tune.py efficiency` measures rung rankings with)."""
    if spec.tune.rung_cooldown is None:
        return None
    return CooldownRungs(tuple(rung_steps(spec)), spec.tune.rung_cooldown)


def pause_steps(spec: JobSpec) -> tuple[int, ...]:
    """Steps where a trial's Train run checkpoints and ends, and the trial reports and
    waits: every rung under `scheduler: sha`, which pauses the trial there and may resume
    it later from that checkpoint (`lmforge.tune.halving`)."""
    return tuple(rung_steps(spec)) if spec.tune.scheduler == "sha" else ()


def ranking_metric(cfg: TuneConfig) -> str:
    """The metric ASHA and the searcher rank trials by: the fork's loss at cooldown rungs
    (`search_loss`), else `tune.metric`."""
    return cfg.metric if cfg.rung_cooldown is None else SEARCH_METRIC


def train_driver_fn(config: dict[str, Any], spec: JobSpec, data: PreparedData,
                    parent: RunTracker | None, experiment_id: str,
                    run_tags: dict[str, str] | None = None,
                    step_hook: StepHook | None = None, stop_flag: Any = None) -> None:
    """One trial (Tune's function trainable; it runs in its own resource bundle).

    An invalid sample or a crash fails this trial only: its MLflow run is FAILED with the
    error as a tag and a traceback artifact, and Tune goes on with the next trial.

    A resumed search starts the trials the kill interrupted again, from the top of this
    function under the same name (Tune holds no checkpoint of theirs: TuneReportCallback
    passes only the path). Ray Train finds their run in storage and continues it from its
    latest checkpoint, so the steps, and the tokens TokenBudget has counted, are not
    trained again.

    With `tune.trial_timeout_s`, a trial still running at its deadline (hung in a
    collective, waiting for workers, ...) raises `TrialTimeout`: Tune records it as an
    errored trial (FAILED in the outcome and in MLflow) and goes on. Its Train run aborts
    itself just after (`Deadline`), freeing its workers for the next trial: Tune stopping
    the trial's actor does not end the Train controller it started.

    `stop_flag` (the search driver's `StopFlag`, set on SIGTERM): the trial's workers save
    a checkpoint at the next step boundary and stop; the trial's MLflow run is KILLED, the
    driver is told, and the trial then waits, still running in Tune's eyes, for the driver
    to save the search's state and end it. A trial Tune saw finish would count as done and
    an errored one is not resumed; a running one is what `--resume` starts again, and its
    Train run goes on from that checkpoint.
    """
    started = time.monotonic()
    ctx = tune.get_context()
    trial_name = ctx.get_trial_name()
    name = f"{ctx.get_experiment_name()}-{trial_name}"
    tracker = None
    if parent is not None:
        trial_dir = Path(ctx.get_trial_dir()).name
        # A trial `scheduler: sha` paused and now promotes goes on in its own run.
        tracker = paused_run(parent, trial_dir) or RunTracker.start(
            parent.uri, experiment_id, trial_name, parent=parent, tags={
                **(run_tags or {}), "lmforge.trial_id": ctx.get_trial_id(),
                "lmforge.trial_dir": trial_dir})
        tracker.log_params(config)  # the same values again, for a continued run
    try:
        trial_spec = spec.with_values(config)
        metrics = contextlib.nullcontext()
        if tracker is not None:
            tracker.log_dict(trial_spec.model_dump(mode="json"), "spec.yaml")
            metrics = tracker.system_metrics(spec.tracking.system_metrics_interval_s)
        callbacks: list[Any] = [ReportToTune()]  # here: it needs this thread's session
        if (timeout_s := spec.tune.trial_timeout_s) is not None:
            # The trial fails with TrialTimeout at its deadline, and its Train run (workers,
            # placement group) ends itself a moment later: later, so the run's own error
            # (its controller gone) cannot reach this thread first.
            at = time.time() + timeout_s - (time.monotonic() - started) + ABORT_GRACE_S
            callbacks.append(Deadline(at, f"trial {trial_name} ran past tune.trial_timeout_s"))
        with metrics:
            within(timeout_s, started, lambda: run_training(
                trial_spec, data, tracker, name=name, callbacks=callbacks,
                step_hook=step_hook, stop_flag=stop_flag,
                cooldown=cooldown_rungs(spec), pause_at=pause_steps(spec)))
    except Paused as e:
        # At a rung of `scheduler: sha`, with the Train run over (its workers and placement
        # group freed): only now does Tune see the rung's result, so when the scheduler
        # pauses or stops the trial, its actor ends with no Train run left to orphan.
        # Its MLflow run stays open for the run that goes on (`paused_run`).
        tune.report(e.metrics)
        threading.Event().wait()  # until Tune pauses or stops this trial (it always does)
    except Preempted as e:
        if tracker is not None:
            record_failure(tracker, e, traceback.format_exc(), status="KILLED", curve=True)
        ray.get(stop_flag.stopped.remote(ctx.get_trial_id(), e.step), timeout=60)
        threading.Event().wait()  # until Tune ends this actor (see above)
    except Exception as e:
        if tracker is not None:  # never raises: an MLflow outage must not hide `e`
            record_failure(tracker, e, traceback.format_exc(), curve=True)
        raise
    if tracker is not None:
        tracker.log_loss_curve()
        tracker.finish()

def within(timeout_s: float | None, started: float, fn: Callable[[], T]) -> T:
    """`fn()`, or `TrialTimeout` once `timeout_s` has passed since `started`.

    `fn` runs in a daemon thread that is left behind on a timeout: nothing can interrupt a
    thread blocked in Ray (`TorchTrainer.fit` waits on its controller); the `Deadline` of
    the Train run it started ends that run.
    """
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=run, name="lmforge-trial", daemon=True)
    thread.start()
    thread.join(max(0.0, started + timeout_s - time.monotonic()))
    if thread.is_alive():
        raise TrialTimeout(f"the trial ran past tune.trial_timeout_s ({timeout_s:g} s) and "
                           "was stopped")
    if "error" in box:
        raise box["error"]
    return box["result"]
