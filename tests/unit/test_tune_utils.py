"""Search-space translation and trial sizing (pure functions; Ray is imported, not started)."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time

import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from lmforge.config import JobSpec
from lmforge.runs import NamedRun, ResumeError, RunState
from lmforge.tracking import RunTracker, experiment_id
from lmforge.tune.report import (
    TrialOutcome,
    _study,
    close_orphaned_trials,
    close_stopped_trials,
    pareto_front,
)
from lmforge.tune.search import (
    TokenBudget,
    check_settings_unchanged,
    make_scheduler,
    make_searcher,
    objectives,
    search_settings,
    startup_trials,
)
from lmforge.tune.space import distributions
from lmforge.tune.trial import TrialTimeout, within

SPACE = {
    "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.2},
    "model.n_layer": {"type": "int", "low": 1, "high": 3},
    "model.n_embd": {"type": "choice", "values": [32, 64, 96]},
}


def spec_with(**sections) -> JobSpec:
    return JobSpec.model_validate(sections)


@pytest.fixture(scope="module")
def domains():
    return distributions(spec_with(tune={"search_space": SPACE}).tune.search_space)


def draw_all(domains, n: int = 2000, seed: int = 0) -> list[dict]:
    """`n` samples of the whole space, drawn by Optuna's random sampler from the
    distributions (as the searcher's sampler draws them)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(fixed_distributions=domains).params for _ in range(n)]


def draw(domains, key: str) -> np.ndarray:
    return np.asarray([p[key] for p in draw_all(domains)])


def test_every_dim_maps_to_its_optuna_distribution(domains):
    assert domains.keys() == SPACE.keys()
    assert domains["train.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert domains["train.weight_decay"] == FloatDistribution(0.0, 0.2)
    assert domains["model.n_layer"] == IntDistribution(1, 3)
    assert domains["model.n_embd"] == CategoricalDistribution([32, 64, 96])


def test_float_samples_lie_in_range(domains):
    lr = draw(domains, "train.lr")
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2
    # Log-uniform: about half the draws fall below the geometric mean 1e-3.
    assert 0.4 < (lr < 1e-3).mean() < 0.6
    wd = draw(domains, "train.weight_decay")
    assert wd.min() >= 0.0 and wd.max() <= 0.2
    assert 0.4 < (wd < 0.1).mean() < 0.6


def test_int_high_is_inclusive(domains):
    assert set(draw(domains, "model.n_layer").tolist()) == {1, 2, 3}


def test_choice_samples_the_given_values(domains):
    assert set(draw(domains, "model.n_embd").tolist()) == {32, 64, 96}


def test_a_sampled_trial_config_is_a_valid_spec(domains):
    spec = spec_with(tune={"search_space": SPACE}, model={"n_head": 4},
                     train={"steps": 20, "warmup_steps": 2})
    for config in draw_all(domains, n=5, seed=1):
        trial = spec.with_values(config)
        assert trial.train.lr == pytest.approx(float(config["train.lr"]))
        assert trial.model.n_layer == int(config["model.n_layer"])
        assert trial.model.n_embd == config["model.n_embd"]


# --- searcher, scheduler, budget, Pareto set -----------------------------------------


def outcome(n: int, loss: float, speed: float, error: str | None = None,
            lr: float = 1e-3) -> TrialOutcome:
    return TrialOutcome(trial_id=f"t{n}", config={"train.lr": lr}, status="FINISHED",
                        steps=10, val_loss=loss, best_val_loss=loss, tokens_per_s=speed,
                        tokens=100, checkpoint=f"/c{n}", mlflow_run_id=f"r{n}", error=error)


def test_token_budget_sums_each_trials_latest_report():
    stop = TokenBudget(1000)
    assert stop("a", {"tokens": 300}) is False and not stop.stop_all()
    stop("a", {"tokens": 600})  # the same trial again: its latest count, not a sum
    stop("b", {"tokens": 300})
    assert not stop.stop_all()
    stop("b", {"tokens": 400})
    assert stop.stop_all()


def test_token_budget_keeps_its_count_through_tunes_experiment_snapshot():
    # Tune writes the stopper into each experiment-state snapshot with this encoder, and a
    # resumed search runs with what this decoder gives back (TuneController.save_to_dir and
    # .resume): the budget must come back with its count, not empty.
    from ray.tune.utils.serialization import TuneFunctionEncoder, _loads_with_cloudpickle

    stop = TokenBudget(1000)
    stop("finished", {"tokens": 600})
    stop("interrupted", {"tokens": 200})
    snapshot = json.dumps({"_stopper": stop}, cls=TuneFunctionEncoder)
    restored = _loads_with_cloudpickle(snapshot)["_stopper"]
    assert restored.max_tokens == 1000 and not restored.stop_all()
    # The interrupted trial continues its Train run from a checkpoint, so its counts go on
    # from 200: 300 more tokens reach the budget, where a fresh count would need 1000.
    restored("interrupted", {"tokens": 500})
    assert restored.stop_all()


def test_scheduler_is_asha_in_steps_unless_fifo_or_multi_objective():
    spec = spec_with(train={"steps": 100, "warmup_steps": 1},
                     tune={"grace_period": 10, "reduction_factor": 3})
    asha = make_scheduler(spec)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "step"
    assert asha._max_t == 100 and asha._reduction_factor == 3
    for tune_cfg in ({"scheduler": "fifo"}, {"multi_objective": True}):
        other = spec.model_copy(update={"tune": spec.tune.model_copy(update=tune_cfg)})
        assert type(make_scheduler(other)) is FIFOScheduler


def test_searcher_objectives_and_seeded_samplers():
    import optuna

    single = spec_with(tune={"seed": 7}).tune
    assert objectives(single) == {"val_loss": "min"}
    tpe = make_searcher(single)
    assert tpe._metric == "val_loss" and isinstance(tpe._sampler, optuna.samplers.TPESampler)
    assert tpe._sampler._n_startup_trials == 2  # 4 trials: a third, at least 2
    multi = spec_with(tune={"multi_objective": True, "searcher": "random"}).tune
    assert objectives(multi) == {"val_loss": "min", "tokens_per_s": "max"}
    rnd = make_searcher(multi)
    assert rnd._metric == ["val_loss", "tokens_per_s"] and rnd._mode == ["min", "max"]
    assert isinstance(rnd._sampler, optuna.samplers.RandomSampler)


def test_tpe_startup_trials_scale_with_the_search_unless_set():
    assert [startup_trials(spec_with(tune={"num_trials": n}).tune) for n in (1, 12, 40, 90)] \
        == [2, 4, 10, 10]
    assert startup_trials(spec_with(tune={"num_trials": 12, "startup_trials": 7}).tune) == 7


def test_pareto_front_keeps_the_non_dominated_trials():
    trials = [outcome(0, 1.0, 100), outcome(1, 1.2, 300), outcome(2, 1.1, 200),
              outcome(3, 1.3, 150), outcome(4, 1.05, 90)]
    front = pareto_front(trials)
    # 3 is beaten by 1 and 2 on both; 4 by 0. Sorted by loss.
    assert [t.trial_id for t in front] == ["t0", "t2", "t1"]


def test_study_marks_failed_trials_and_keeps_params():
    from optuna.trial import TrialState

    space = spec_with(tune={"search_space": SPACE}).tune.search_space
    trials = [outcome(0, 1.0, 1, lr=2e-3), outcome(1, float("inf"), 0, error="boom", lr=5e-3)]
    study = _study(trials, space, multi=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[0].params == {"train.lr": 2e-3} and study.best_value == 1.0


def test_resume_refuses_search_settings_that_tune_restore_would_ignore(tmp_path):
    """Tuner.restore brings back the searcher, scheduler, budget and trial count: a spec
    changing them on --resume is refused naming each field, not silently overridden."""
    def spec(**tune):
        return spec_with(tune={"enabled": True, "storage_path": str(tmp_path),
                               "search_space": SPACE, "max_tokens": 1000, **tune})

    started = spec()
    named = NamedRun("s", str(tmp_path), search=True)
    named.record(RunState("r", "0", "sqlite:///x.db", search_settings(started.tune)))
    check_settings_unchanged(started, named.state(), "s")
    # Read afresh on a resume, so free to change:
    check_settings_unchanged(spec(driver_cpus=0.5), named.state(), "s")
    with pytest.raises(ResumeError) as e:
        check_settings_unchanged(spec(max_tokens=5000, num_trials=9), named.state(), "s")
    assert "tune.max_tokens: 1000 when it started, 5000 now" in str(e.value)
    assert "tune.num_trials: 4 when it started, 9 now" in str(e.value)
    # `lmforge tune --resume` (and `run --resume`, and a resubmitted job) go through
    # execute, which refuses before anything is started.
    from lmforge.pipeline import Stages, execute

    changed = spec(max_tokens=5000)
    changed.tracking.run_name = "s"
    with pytest.raises(ResumeError, match="tune.max_tokens: 1000 when it started"):
        execute(changed, Stages(search=True, register=False, serve_check=False),
                runs_dir=tmp_path / "runs", resume=True)
    assert not (tmp_path / "runs").exists()
    # A state file from before the settings were recorded: nothing to compare.
    (tmp_path / "s" / "lmforge_run.json").unlink()
    (tmp_path / "s" / "lmforge_search.json").write_text(json.dumps({"parent_run_id": "r"}))
    check_settings_unchanged(spec(max_tokens=5000), named.state(), "s")


# --- a trial's deadline --------------------------------------------------------------


def test_within_returns_what_the_trial_returns_and_raises_what_it_raises():
    assert within(5, time.monotonic(), lambda: 42) == 42
    assert within(None, time.monotonic(), lambda: 7) == 7

    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        within(5, time.monotonic(), fail)


def test_a_hung_trial_times_out_at_its_deadline():
    hang = threading.Event()  # never set: a trial blocked for good
    started = time.monotonic() - 0.5  # the deadline counts from the trial's start
    with pytest.raises(TrialTimeout, match=r"tune.trial_timeout_s \(0.8 s\)"):
        within(0.8, started, hang.wait)
    assert time.monotonic() - started == pytest.approx(0.8, abs=0.3)


def test_resume_closes_only_the_runs_of_trials_it_runs_again(tmp_path):
    """A driver killed after ASHA stopped a trial (its MLflow run still open) and while
    another ran: on resume the running one's run is closed as continued elsewhere; the
    stopped one is not run again, so its run waits for the search's end to be closed with
    its outcome, and gets no note saying it was continued."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = experiment_id(uri, "resume", tmp_path / "mlartifacts")
    parent = RunTracker.start(uri, experiment, "search")
    runs = {d: RunTracker.start(uri, experiment, d, parent=parent,
                                tags={"lmforge.trial_dir": d})
            for d in ("stopped_by_asha", "interrupted")}
    close_orphaned_trials(parent, ended={"stopped_by_asha"})
    assert runs["interrupted"].status() == "KILLED"
    assert "continued this trial under a new run" in runs["interrupted"].client.get_run(
        runs["interrupted"].run_id).data.tags["lmforge.note"]
    assert runs["stopped_by_asha"].status() == "RUNNING"
    assert "lmforge.note" not in runs["stopped_by_asha"].client.get_run(
        runs["stopped_by_asha"].run_id).data.tags


def test_a_stopped_trials_run_gets_the_evaluation_it_was_stopped_on(tmp_path):
    """ASHA stops a trial at a report whose val_loss its worker had not sent to MLflow yet
    (sent in the background; the workers end with the trial): closing the run records the
    val_loss Tune got, once, and leaves a run that has it alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = experiment_id(uri, "stopped", tmp_path / "mlartifacts")
    parent = RunTracker.start(uri, experiment, "search")
    lost, sent = (RunTracker.start(uri, experiment, name, parent=parent)
                  for name in ("lost", "sent"))
    for run in (lost, sent):
        run.log_metrics({"val_loss": 3.0}, step=10)
    sent.log_metrics({"val_loss": 2.5}, step=20)
    stopped = [dataclasses.replace(outcome(0, 2.5, 1.0), status="STOPPED", steps=20,
                                   mlflow_run_id=run.run_id) for run in (lost, sent)]
    close_stopped_trials(uri, stopped)
    for run in (lost, sent):
        assert run.metric_history("val_loss") == [(10, 3.0), (20, 2.5)]
        assert run.status() == "KILLED"
    assert [v for _, v in lost.metric_history("val_ppl")] == [pytest.approx(math.exp(2.5))]
