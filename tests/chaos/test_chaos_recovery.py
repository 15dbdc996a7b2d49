"""Recovery from a killed process: each scenario kills part of a real run and asserts the
run goes on from where it was, losing nothing but the steps since its last checkpoint.

- A training worker SIGKILLed: Ray Train replaces the worker group, which resumes from the
  latest checkpoint and logs the uninterrupted run's loss at every later step.
- The `lmforge train` driver SIGKILLed (FSDP), a half-written checkpoint left behind: the
  same command refuses to start over it without `--resume`; with it, the run resumes
  exactly and ignores the half-written one.
- The `lmforge tune` driver killed while its second trial runs, its Tune state left cut
  short: the resumed search goes on from lmforge's last intact copy of that state, does not
  rerun the finished trial, continues the interrupted one from its checkpoint, samples only
  what is left of `tune.num_trials`, stays under one parent run, and keeps counting
  `tune.max_tokens` from where the killed driver left it.

These were integration tests; they are fault injection, so they run with the chaos suite
(`make test-chaos`, a CI step) and `make test` stays within its budget.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from lmforge.config import load
from lmforge.pipeline import Stages, Summary, execute
from lmforge.runs import resume_target
from lmforge.tracking import RunTracker
from lmforge.tune.report import trial_runs
from lmforge.tune.snapshot import latest_snapshot

from ..integration.helpers import (
    BIN,
    SPEC,
    TRAIN_POLL_ENV,
    TRAIN_POLL_S,
    file_size,
    kill_driver_when,
    lmforge,
    own_cluster_env,
    tree_size,
    wait_until,
)
from ..integration.test_train import (
    DDP,
    FSDP,
    STALL_S,
    TRAIN_ONLY,
    assert_resumed_exactly,
    loss_history,
    overrides,
    reference_run,
    summary_of,
)


@pytest.fixture(scope="module")
def ddp_reference(ray_cluster, tmp_path_factory) -> Summary:
    return reference_run(tmp_path_factory, "ddp", DDP)


@pytest.fixture(scope="module")
def fsdp_reference(ray_cluster, tmp_path_factory) -> Summary:
    return reference_run(tmp_path_factory, "fsdp", FSDP)


def test_killed_worker_is_replaced_and_the_run_resumes_exactly(
        ddp_reference, ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        chaos_result):
    """Ray Train restarts the worker group from the latest checkpoint (FailureConfig) and
    the run finishes all its steps with the uninterrupted run's losses."""
    reference = dict(loss_history(ddp_reference))
    spec = load(SPEC, overrides(tmp_path, *DDP, "train.max_failures=2",
                                "tracking.run_name=interrupted"))
    storage = tmp_path / "ray" / "interrupted"
    monkeypatch.setenv(TRAIN_POLL_ENV, TRAIN_POLL_S)  # a report every 2 s: time to kill
    outcome: dict[str, Any] = {}
    run = threading.Thread(target=lambda: outcome.update(
        summary=execute(spec, TRAIN_ONLY, runs_dir=tmp_path)))
    run.start()
    # Progress: the run's MLflow store (a loss every step) and its storage.
    moving = lambda: (file_size(tmp_path / "mlflow.db"), tree_size(storage))  # noqa: E731

    def live_workers() -> list[int]:
        """PIDs of this cluster's training workers, named by its address: with another Ray
        on the machine, the State API cannot guess which one is meant."""
        return [a.pid for a in list_actors(address=ray_cluster, filters=[
            ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]

    # The workers' PIDs first (a State API call can take seconds on a loaded machine), so
    # that the kill follows the checkpoint at once.
    workers = wait_until(lambda: live_workers() or not run.is_alive(),
                         "training workers started", progress=moving, stall_s=STALL_S,
                         interval_s=0.5)
    # Kill a worker once Ray Train has registered a checkpoint (its snapshot lists it; a
    # checkpoint directory alone may not be registered yet): bounded polling, not a sleep.
    wait_until(lambda: (storage / "checkpoint_manager_snapshot.json").exists()
               or not run.is_alive(), "a checkpoint registered", progress=moving,
               stall_s=STALL_S, interval_s=0.05)
    assert run.is_alive(), "no checkpoint registered"
    assert workers, "no live training worker to kill"
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: not run.is_alive(), "the run after the kill", progress=moving,
               stall_s=STALL_S, interval_s=0.5)

    summary = outcome["summary"]
    chaos_result("a training worker SIGKILLed", load="2-worker DDP training, 120 steps, a "
                 "checkpoint every 20", faults="one worker SIGKILLed once a checkpoint is "
                 "registered", lost=f"{120 - summary.steps} steps ("
                 f"{summary.resumed_from_step} kept from the checkpoint, losses equal the "
                 "uninterrupted run's)", resumed_from_step=summary.resumed_from_step,
                 attempts=summary.attempts)
    assert_resumed_exactly(summary, reference, steps=120, checkpoint_every=20)


def test_killed_driver_resumes_exactly_and_ignores_a_half_written_checkpoint(
        fsdp_reference, tmp_path: Path, chaos_result):
    reference = dict(loss_history(fsdp_reference))
    args = ["train", str(SPEC), *overrides(tmp_path, *FSDP), "tracking.run_name=resumable"]
    run_dir = tmp_path / "ray" / "resumable"
    # Kill the driver once Ray Train has registered a checkpoint (its snapshot lists it).
    kill_driver_when([sys.executable, "-m", "lmforge", *args],
                     lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(),
                     "a checkpoint registered", cwd=tmp_path, log=tmp_path / "killed.log",
                     env=own_cluster_env(**{TRAIN_POLL_ENV: TRAIN_POLL_S}), stall_s=STALL_S)

    # A crash in the middle of writing a checkpoint leaves a directory like this one.
    half = run_dir / "checkpoint_9999999" / "dcp"
    half.mkdir(parents=True)
    (half / "__0_0.distcp").write_bytes(b"\0" * 100)

    refused = lmforge(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    summary = summary_of(lmforge("train", "--resume", *args[1:], cwd=tmp_path,
                                 stall_s=STALL_S))
    chaos_result("the `lmforge train` driver SIGKILLed", load="2-worker FSDP training, 150 "
                 "steps, a checkpoint every 25", faults="driver SIGKILLed once a checkpoint "
                 "is registered, a half-written checkpoint left behind",
                 lost=f"{150 - summary.steps} steps (`--resume` from step "
                 f"{summary.resumed_from_step}, losses equal the uninterrupted run's)",
                 resumed_from_step=summary.resumed_from_step)
    assert summary.run_name == "resumable"
    assert_resumed_exactly(summary, reference, steps=150, checkpoint_every=25)


def test_resume_after_killed_driver(ray_cluster, tiny_spec, tmp_path: Path, chaos_result):
    # 256 tokens a step (1 worker x 8 sequences x 32 tokens), reported every 20 steps. The
    # budget is 160 steps: trial 1's 100 and 60 of trial 2's, which the kill interrupts
    # after its first report. A resumed search with a fresh budget would train 200.
    tokens_per_step, steps_per_report = 256, 20
    overrides = [f"data.cache_dir={tmp_path / 'cache'}",
                 f"train.storage_path={tmp_path / 'ray'}", f"tune.storage_path={tmp_path / 'ray'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "tracking.run_name=resumable", "tracking.system_metrics_interval_s=0",
                 "train.workers=1", "train.steps=100", f"train.eval_every={steps_per_report}",
                 "tune.num_trials=2", "tune.scheduler=fifo",
                 f"tune.max_tokens={160 * tokens_per_step}", "registry.enabled=false"]
    experiment = tmp_path / "ray" / "resumable"
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="0",  # save Tune's state every loop
               **{TRAIN_POLL_ENV: TRAIN_POLL_S})  # a report every 2 s: time to kill
    # Kill once trial 2 has a checkpoint, i.e. after its first report: both trials' Ray
    # Train runs (ray/resumable-<trial>/) have registered one. The next report comes ~2 s
    # later (Ray Train passes on reports at its health-check interval), and the budget
    # stops the search at trial 2's third. Train's own record, not Tune's result.json:
    # Tune's loop falls behind under load while the reports queue up for it, so by the
    # time result.json shows the first, the third can be right behind.
    kill_driver_when([str(BIN / "lmforge"), "tune", str(SPEC), *overrides],
                     lambda: len(list(experiment.parent.glob(
                         "resumable-*/checkpoint_manager_snapshot.json"))) == 2,
                     "trial 2 registered a checkpoint", cwd=tmp_path, env=env,
                     log=tmp_path / "driver.log")

    # Tune writes its experiment state in place, rewritten every loop here: a kill can
    # land mid-write, and CI once saw it leave the file empty. Make that happen every time:
    # the resume must go on from lmforge's last intact snapshot of Tune's state.
    (state,) = experiment.glob("experiment_state-*.json")
    assert latest_snapshot(pyarrow.fs.LocalFileSystem(), str(experiment)) is not None
    state.write_bytes(b"")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec(*overrides[4:])
    assert resume_target(spec, search=True, spec_path=SPEC).name == "resumable"
    parent_id = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("integration").experiment_id],
        filter_string="tags.mlflow.runName = 'resumable'")[0].info.run_id
    before = trial_runs(RunTracker(uri, parent_id))
    finished_before = {d for d, r in before.items() if r.info.status == "FINISHED"}
    assert len(finished_before) == 1 and len(before) == 2

    summary = execute(spec, Stages(search=True, register=False, serve_check=False),
                      runs_dir=tmp_path / "runs", resume=True)
    chaos_result("the `lmforge tune` driver killed", load="a 2-trial search, one trial at a "
                 "time, a budget of 160 steps", faults="driver SIGKILLed during trial 2, "
                 "Tune's experiment state left empty", lost=f"0 trials (the finished one "
                 f"not rerun); {summary.trial_steps_total} of 160 budgeted steps trained",
                 trials=summary.trials, trials_failed=summary.trials_failed)
    assert summary.mlflow_run_id == parent_id
    assert summary.trials == 2  # the searcher knew one of its two samples was done
    assert summary.trials_failed == 0
    # The budget counted trial 1 and trial 2's steps before the kill: trial 2 stops at 60
    # (one report more may be in flight when the budget stops it), not at 100.
    assert 160 <= summary.trial_steps_total <= 160 + steps_per_report, summary

    client = MlflowClient(uri)
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_trial: dict[str, list] = {}
    for child in children:
        by_trial.setdefault(child.data.tags["lmforge.trial_dir"], []).append(child)
    assert len(by_trial) == 2
    (finished,), (interrupted,) = finished_before, set(by_trial) - finished_before
    # Not rerun: still its one original run.
    assert [r.info.run_id for r in by_trial[finished]] == [before[finished].info.run_id]
    # The interrupted trial: its run closed as KILLED, and a new run that continued from a
    # checkpoint (its first evaluation is past the first report) until the budget stopped it.
    killed, continued = sorted(by_trial[interrupted], key=lambda r: r.info.start_time)
    assert killed.info.run_id == before[interrupted].info.run_id
    assert killed.info.status == continued.info.status == "KILLED"
    evaluated = [m.step for m in client.get_metric_history(continued.info.run_id, "val_loss")]
    assert min(evaluated) > steps_per_report, evaluated
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert state.read_bytes()  # Tune's state is whole again, and the cut copy kept aside
    kept = experiment.glob(f".lmforge-state/damaged-*/{state.name}")
    assert [f.stat().st_size for f in kept] == [0]
