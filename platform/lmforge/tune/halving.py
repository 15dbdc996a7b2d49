"""Synchronous successive halving (`tune.scheduler: sha`): every trial trains to the first
rung and waits there, PAUSED, until all have; the best 1/reduction_factor of them (at least
one) go on to the next rung, the rest stop; and so on to `train.steps`.

Why not Ray's: `ASHAScheduler` is the asynchronous form, which cannot stop the first trials
to reach a rung (no other trial has a score there yet), so they run to the end; measured
by `bench/tune.py replay` to cost a third more steps than this on the reference search
(docs/measurements/2026-12-03-search-cooldown.md). `HyperBandScheduler` is synchronous but
derives its rungs from `max_t` alone (no grace period) and spreads the trials over several
brackets. This scheduler is one bracket on ASHA's rungs (`trial.rung_steps`), so the two
are compared on the same milestones. Written by hand for that reason (about 150 lines
with its limiter); run for real on seed 1 it spent what the replay predicted (7,450 steps).

At a rung a trial's Train run checkpoints and ends, and only then does the trial report
the rung's result (`trial.pause_steps`, `train_driver_fn`): pausing or stopping a trial
ends its actor, and a Train run still going then is orphaned (its controller retries the
workers it lost, and a placement group can stay reserved). So every trial at a rung is
PAUSED, even the one whose result completes the rung and is promoted: when a promoted
trial runs again, Tune starts its function again, its Train run resumes from the rung's
checkpoint and its MLflow run goes on.

Concurrency: Tune starts every PENDING trial it has (resources allowing, and a trial's
own bundle here is only its driver's), so what runs at once is bounded by how many trials
the searcher creates. Tune's `max_concurrent_trials` wraps the searcher in a
`ConcurrencyLimiter`, which counts a paused trial as live until it ends: with every trial
of the bracket paused at the first rung, no room would be left for the trials still to
reach it. `RungLimiter` is that limiter without the trials waiting at a rung, and
`choose_trial_to_run` restarts a promoted trial only when a running slot is free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

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
        self._decided: set[int] = set()  # rungs ranked already (seen again on a restore)

    def limit(self, searcher: Searcher) -> RungLimiter:
        """`searcher`, creating trials only while fewer than `max_concurrent` are live
        and not waiting at a rung: pass it as Tune's `search_alg`, with no
        `max_concurrent_trials`."""
        return RungLimiter(searcher, self)

    def waiting(self) -> set[str]:
        """The trials paused at a rung that is not decided yet."""
        return {t for t in self._added if self._waiting(t)}

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
        last = trial.last_result or {}
        step = last.get(self._time_attr, 0)
        level = self._level[tid] = sum(rung < step for rung in self._rungs)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            self._ended.add(tid)
            if trial.status == Trial.TERMINATED and step in self._rungs:
                self._decided.add(level)  # only a ranked rung stops a trial at its step
        elif step in self._rungs and self._metric in last:  # it was waiting at that rung
            self._scores[level][tid] = float(last[self._metric])
            # Restored trials come back PENDING, and Tune starts every PENDING trial:
            # this one waits for its rung to be decided (or, if it was, for its turn).
            trial.set_status(Trial.PAUSED)

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
        self._promote_restored()
        trials = tune_controller.get_trials()
        # PENDING trials are started by Tune whatever this returns: they count as running.
        if sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials) \
                >= self._max_concurrent:
            return None
        # Promoted trials first: the bracket moves on before new trials start.
        for t in trials:
            if t.status in (Trial.PAUSED, Trial.PENDING) and t.trial_id in self._promoted:
                return t
        return None  # new trials start as the searcher creates them (`RungLimiter`)

    def debug_string(self) -> str:
        reached = ", ".join(f"{rung}: {len(s)}" for rung, s in zip(self._rungs, self._scores,
                                                                     strict=True))
        return (f"Synchronous successive halving of {len(self._added)}/{self._num_trials} "
                f"trials; scored at each rung: {reached}")

    # --- the bracket -------------------------------------------------------------------

    def _waiting(self, tid: str) -> bool:
        level = self._level.get(tid, 0)
        return level < len(self._rungs) and tid in self._scores[level] \
            and tid not in self._promoted and tid not in self._ended

    def _promote_restored(self) -> None:
        """After a restore: the trials waiting at a rung the search had ranked already
        are the ones it promoted (the rest were stopped there)."""
        for level in sorted(self._decided):
            for tid in self._at(level):
                if tid in self._scores[level]:
                    self._level[tid] = level + 1
                    self._promoted.add(tid)

    def _at(self, level: int) -> list[str]:
        """The live trials training towards (or waiting at) rung `level`."""
        return [t for t in self._added if self._level[t] == level and t not in self._ended]

    def _complete(self, level: int) -> bool:
        """Every trial that can reach rung `level` has, and it is not decided yet: the
        bracket is full, no live trial is below it, and all at it are scored."""
        if len(self._added) < self._num_trials or level in self._decided:
            return False
        if any(self._level[t] < level for t in self._added if t not in self._ended):
            return False
        here = self._at(level)
        return bool(here) and all(t in self._scores[level] for t in here)

    def _decide(self, tune_controller: TuneController, level: int,
                running: str | None = None) -> str:
        """Rank rung `level`: promote the best, stop the rest. Returns the decision for
        the `running` trial (the one whose result completed the rung), if any: PAUSE
        when promoted (its Train run has ended at the rung), else STOP."""
        self._decided.add(level)
        scored = self._scores[level]
        ranked = sorted(self._at(level), key=scored.__getitem__)
        keep = set(ranked[:max(1, len(ranked) // self._rf)])
        by_id = {t.trial_id: t for t in tune_controller.get_trials()}
        decision = TrialScheduler.PAUSE
        for tid in ranked:
            if tid in keep:
                self._level[tid] = level + 1
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


class RungLimiter(ConcurrencyLimiter):
    """Tune's `ConcurrencyLimiter` (at most `max_concurrent_trials` live trials) that does
    not count the trials `halving` has paused at a rung: they hold no resources while
    they wait, and the bracket needs every trial at the rung before it can go on."""

    def __init__(self, searcher: Searcher, halving: SyncHalving) -> None:
        super().__init__(searcher, max_concurrent=halving._max_concurrent)
        self._halving = halving

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        # ConcurrencyLimiter.suggest, counting live trials less the waiting ones.
        if len(self.live_trials - self._halving.waiting()) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion

    def get_state(self) -> dict[str, Any]:
        """Saved with the search's state, less the scheduler (Tune rebuilds it)."""
        return {k: v for k, v in super().get_state().items() if k != "_halving"}
