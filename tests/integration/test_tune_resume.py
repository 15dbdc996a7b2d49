"""`lmforge tune` killed while its second trial runs, its Tune state left cut short; the
resumed search goes on from lmforge's last intact copy of that state, does not rerun the
finished trial, continues the interrupted one from its checkpoint, samples only what is
left of `tune.num_trials`, stays under one parent run, and keeps counting `tune.max_tokens`
from where the killed driver left it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from lmforge.pipeline import Stages, execute
from lmforge.runs import resume_target
from lmforge.tracking import RunTracker
from lmforge.tune.report import trial_runs
from lmforge.tune.snapshot import latest_snapshot

from .helpers import BIN, SPEC, TRAIN_POLL_ENV, TRAIN_POLL_S, kill_driver_when


def test_resume_after_killed_driver(ray_cluster, tiny_spec, tmp_path: Path):
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
    assert latest_snapshot(experiment) is not None
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
