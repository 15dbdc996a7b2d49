"""Synchronous successive halving (`tune.scheduler: sha`): every trial trains to the first
rung and waits there, PAUSED, until all have; the best 1/reduction_factor of them (at least
one) go on to the next rung, the rest stop; and so on to `train.steps`.

Why not Ray's: `ASHAScheduler` is the asynchronous form, which cannot stop the first trials
to reach a rung (no other trial has a score there yet), so they run to the end; measured
by `bench/tune.py replay` to cost a third more steps than this on the reference search
(docs/measurements/2026-12-03-search-cooldown.md). `HyperBandScheduler` is synchronous but
derives its rungs from `max_t` alone (no grace period) and spreads the trials over several
brackets. This scheduler is one bracket on ASHA's rungs (`trial.rung_steps`), so the two
are compared on the same milestones. Written by hand for that reason; about 100 lines.

A paused trial's actor ends. When it is promoted, Tune starts its function again and its
Train run continues from the checkpoint it wrote at the rung (`trial.checkpoint_steps`);
its MLflow run goes on (`trial.train_driver_fn`).

Concurrency: Tune's `max_concurrent_trials` counts paused trials as live (it wraps the
searcher in a `ConcurrencyLimiter`), which would leave no room for the trials still to
reach a rung; here `choose_trial_to_run` counts only running ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController


class SyncHalving(FIFOScheduler):
    """One successive-halving bracket of `num_trials` trials over `rungs` (steps, by
    `time_attr`), ranking by `metric` (lower is better) and keeping
    `max(1, n // reduction_factor)` of the `n` trials that reached a rung. At most
    `max_concurrent` trials run at once."""

    def __init__(self, metric: str, rungs: list[int], reduction_factor: int,
                 num_trials: int, max_concurrent: int, time_attr: str = "step") -> None:
        super().__init__()
        self._metric, self._time_attr = metric, time_attr
        self._rungs, self._rf = list(rungs), reduction_factor
        self._num_trials, self._max_concurrent = num_trials, max_concurrent
        self._added: list[str] = []
        self._level: dict[str, int] = {}  # trial id -> the rung (index) it trains towards
        self._scores: list[dict[str, float]] = [{} for _ in self._rungs]
        self._ended: set[str] = set()  # finished, errored or stopped: never ranked again
        self._promoted: set[str] = set()  # paused at a decided rung, to run again

    # --- Tune's hooks ------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # ours are fixed at construction (lower `metric` is better)

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        tid = trial.trial_id
        if tid in self._level:
            return
        self._added.append(tid)
        # A restored search adds its trials again, to a scheduler as new as at the start
        # (Tune keeps no scheduler state): each takes up from its last report.
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            self._ended.add(tid)
        last = trial.last_result or {}
        step = last.get(self._time_attr, 0)
        self._level[tid] = sum(rung < step for rung in self._rungs)
        if step in self._rungs and self._metric in last:  # it was waiting at that rung
            self._scores[self._level[tid]][tid] = float(last[self._metric])

    def on_trial_result(self, tune_controller: TuneController, trial: Trial,
                        result: dict[str, Any]) -> str:
        tid, level = trial.trial_id, self._level.get(trial.trial_id, 0)
        self._promoted.discard(tid)  # running again
        if level >= len(self._rungs) or result.get(self._time_attr, 0) < self._rungs[level]:
            return TrialScheduler.CONTINUE
        if tid in self._scores[level]:
            return TrialScheduler.PAUSE  # already scored here and waiting (after a restore)
        self._scores[level][tid] = float(result[self._metric])
        if not self._complete(level):
            return TrialScheduler.PAUSE
        return self._decide(tune_controller, level, running=tid)

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial,
                          result: dict[str, Any]) -> None:
        self._end(tune_controller, trial.trial_id)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        self._end(tune_controller, trial.trial_id)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._end(tune_controller, trial.trial_id)

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        trials = tune_controller.get_trials()
        if sum(t.status == Trial.RUNNING for t in trials) >= self._max_concurrent:
            return None
        # Promoted trials first: the bracket moves on before new trials start.
        for t in trials:
            if t.status in (Trial.PAUSED, Trial.PENDING) and t.trial_id in self._promoted:
                return t
        for t in trials:  # a new trial, or (after a restore) one still short of its rung
            if t.status == Trial.PENDING and not self._waiting(t.trial_id):
                return t
        return None

    def debug_string(self) -> str:
        reached = ", ".join(f"{rung}: {len(s)}" for rung, s in zip(self._rungs, self._scores,
                                                                     strict=True))
        return (f"Synchronous successive halving of {len(self._added)}/{self._num_trials} "
                f"trials; scored at each rung: {reached}")

    # --- the bracket -------------------------------------------------------------------

    def _waiting(self, tid: str) -> bool:
        level = self._level.get(tid, 0)
        return level < len(self._rungs) and tid in self._scores[level] \
            and tid not in self._promoted

    def _at(self, level: int) -> list[str]:
        """The live trials training towards (or waiting at) rung `level`."""
        return [t for t in self._added if self._level[t] == level and t not in self._ended]

    def _complete(self, level: int) -> bool:
        """Every trial that can reach rung `level` has, and it is not decided yet: the
        bracket is full, no live trial is below it, and all at it are scored."""
        if len(self._added) < self._num_trials:
            return False
        if any(self._level[t] < level for t in self._added if t not in self._ended):
            return False
        here = self._at(level)
        return bool(here) and all(t in self._scores[level] for t in here)

    def _decide(self, tune_controller: TuneController, level: int,
                running: str | None = None) -> str:
        """Rank rung `level`: promote the best, stop the rest. Returns the decision for
        the `running` trial (the one whose result completed the rung), if any."""
        scored = self._scores[level]
        ranked = sorted(self._at(level), key=scored.__getitem__)
        keep = set(ranked[:max(1, len(ranked) // self._rf)])
        by_id = {t.trial_id: t for t in tune_controller.get_trials()}
        decision = TrialScheduler.CONTINUE
        for tid in ranked:
            if tid in keep:
                self._level[tid] = level + 1
                if tid != running:
                    self._promoted.add(tid)
            elif tid == running:
                self._ended.add(tid)
                decision = TrialScheduler.STOP
            else:
                self._ended.add(tid)
                tune_controller.stop_trial(by_id[tid])
        return decision

    def _end(self, tune_controller: TuneController, tid: str) -> None:
        """A trial ended on its own (finished early, errored) or was stopped: a rung that
        waited only for it can be decided now."""
        if tid in self._ended:
            return
        self._ended.add(tid)
        self._promoted.discard(tid)
        for level in range(len(self._rungs)):
            if self._complete(level):
                self._decide(tune_controller, level)
