"""`lmforge tune` killed after its first trial finished; the resumed search does not rerun
that trial, samples only what is left of `tune.num_trials`, and stays under one parent run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from lmforge.pipeline import Stages, execute
from lmforge.tracking import RunTracker
from lmforge.tune import resumable_name, trial_runs

from .conftest import SPEC


def test_resume_after_killed_driver(ray_cluster, tiny_spec, tmp_path: Path):
    overrides = [f"data.cache_dir={tmp_path / 'cache'}",
                 f"train.storage_path={tmp_path / 'ray'}", f"tune.storage_path={tmp_path / 'ray'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "tracking.run_name=resumable", "tracking.system_metrics_interval_s=0",
                 "train.workers=1", "train.steps=40", "tune.num_trials=2",
                 "tune.scheduler=fifo", "registry.enabled=false"]
    experiment = tmp_path / "ray" / "resumable"
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="0")  # save Tune's state every loop
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [str(Path(sys.executable).parent / "lmforge"), "tune", str(SPEC), *overrides],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any("TERMINATED" in p.read_text()
                      for p in experiment.glob("experiment_state-*.json")):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
        driver.kill()  # SIGKILL: no cleanup, as when a driver's machine goes away
        driver.wait(timeout=30)
    finally:
        # Ray's own processes of that driver share its fate; take the group down regardless.
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec(*overrides[4:])
    assert resumable_name(spec, "tiny") == "resumable"
    parent_id = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("integration").experiment_id],
        filter_string="tags.mlflow.runName = 'resumable'")[0].info.run_id
    before = trial_runs(RunTracker(uri, parent_id))
    finished_before = {d for d, r in before.items() if r.info.status == "FINISHED"}
    assert len(finished_before) == 1

    summary = execute(spec, Stages(search=True, register=False, serve_check=False),
                      runs_dir=tmp_path / "runs", resume=True)
    assert summary["mlflow_run_id"] == parent_id
    assert summary["trials"] == 2  # the searcher knew one of its two samples was done

    client = MlflowClient(uri)
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_trial: dict[str, list] = {}
    for child in children:
        by_trial.setdefault(child.data.tags["lmforge.trial_dir"], []).append(child)
    assert len(by_trial) == 2
    for trial_dir in finished_before:  # not rerun: still its one original run
        assert [r.info.run_id for r in by_trial[trial_dir]] == [before[trial_dir].info.run_id]
    statuses = sorted(r.info.status for runs in by_trial.values() for r in runs)
    # The trial the kill interrupted (if it had started) is closed as KILLED and rerun.
    assert statuses.count("FINISHED") == 2 and set(statuses) <= {"FINISHED", "KILLED"}
    assert client.get_run(parent_id).info.status == "FINISHED"
