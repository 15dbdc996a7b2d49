"""SIGTERM to `lmforge tune` (what `ray job stop` sends) while two trials train, then
`lmforge tune --resume`: every running trial checkpoints at its next step boundary, the
driver saves the search's state and exits 143 with its MLflow runs KILLED, and the resumed
search continues both trials from those checkpoints: no step lost, none trained twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmforge.pipeline import Summary
from lmforge.train.preempt import EXIT_CODE

from ..integration.helpers import SPEC, file_size, lmforge, own_cluster_env, wait_until

pytestmark = pytest.mark.chaos

STALL_S = 180  # the driver prints as its trials go: this long silent is stuck


def checkpoints(run_dir: Path) -> list[int]:
    """Steps of a Train run's checkpoints (checkpoint_0000123 -> 123)."""
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_*")
                  if p.is_dir())


def test_sigterm_to_a_search_checkpoints_its_trials_and_resume_finishes_them(
        tmp_path: Path, chaos_scale: float, chaos_result):
    steps = int(400 * chaos_scale)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Two trials at once, one worker each (0.1 + 0.9 CPUs each: both fit on 2 CPUs), a
    # checkpoint every 100 steps, every step's loss logged; FIFO so both run to the end.
    args = ["tune", str(SPEC), f"data.cache_dir={tmp_path / 'cache'}",
            f"train.storage_path={tmp_path / 'ray'}", f"tune.storage_path={tmp_path / 'ray'}",
            f"tracking.uri={uri}", "tracking.run_name=searched",
            "tracking.system_metrics_interval_s=0", "train.workers=1", f"train.steps={steps}",
            "train.eval_every=100", "train.log_every=1", "tune.num_trials=2",
            "tune.max_concurrent_trials=2", "tune.scheduler=fifo", "registry.enabled=false"]
    log = tmp_path / "first.log"
    trial_runs = lambda: sorted((tmp_path / "ray").glob("searched-*"))  # noqa: E731
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=tmp_path,
                                  env=own_cluster_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        # Both trials past their first checkpoint: the signal lands between two of them.
        wait_until(lambda: len(trial_runs()) == 2 and all(checkpoints(d) for d in trial_runs())
                   or driver.poll() is not None, "both trials' first checkpoint",
                   progress=lambda: file_size(log), stall_s=STALL_S, interval_s=0.1)
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.send_signal(signal.SIGTERM)  # the driver alone, as `ray job stop` does
        rc = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()

    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("integration").experiment_id],
                                   filter_string="tags.mlflow.runName = 'searched'")
    first_runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    saved: dict[str, int] = {}  # trial name -> the step its checkpoint was saved at
    finished: dict[str, int] = {}  # trial name -> the last step it logged
    for run in first_runs:
        trial = run.info.run_name
        saved[trial] = max(checkpoints(tmp_path / "ray" / f"searched-{trial}"), default=0)
        finished[trial] = max((m.step for m in client.get_metric_history(run.info.run_id,
                                                                         "train_loss")),
                              default=0)
    statuses = sorted(r.info.status for r in first_runs)
    parent_status = client.get_run(parent.info.run_id).info.status

    resumed = lmforge("tune", "--resume", *args[1:], cwd=tmp_path, stall_s=STALL_S)
    summary = Summary(**json.loads(resumed.stdout.strip().splitlines()[-1])) \
        if resumed.returncode == 0 else None
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    logged: dict[str, list[int]] = {}  # trial -> every train_loss step, over both its runs
    continued_from: dict[str, int] = {}  # trial -> the first step its new run logged
    for run in children:
        history = sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                                  "train_loss"))
        logged.setdefault(run.info.run_name, []).extend(history)
        if run.info.run_id not in {r.info.run_id for r in first_runs} and history:
            continued_from[run.info.run_name] = history[0]
    lost = sum(finished[t] - saved[t] for t in saved)
    chaos_result("SIGTERM to lmforge tune, then --resume",
                 load=f"a 2-trial search, both trials at once, {steps} steps each, "
                      "checkpoints every 100",
                 faults="SIGTERM to the driver once both trials had a checkpoint",
                 lost=f"{lost} steps (trials stopped after "
                      f"{', '.join(str(finished[t]) for t in sorted(finished))}, "
                      f"checkpoints at {', '.join(str(saved[t]) for t in sorted(saved))})",
                 exit_code=rc, trial_steps_total=summary.trial_steps_total if summary else -1)

    assert rc == EXIT_CODE, text[-3000:]
    assert "stopped by SIGTERM" in text, text[-3000:]
    assert parent_status == "KILLED"
    assert statuses == ["KILLED", "KILLED"], statuses
    # A checkpoint where each trial stopped (past the regular one at step 100 it had when
    # the signal came): at most one step of work lost.
    assert len(saved) == 2 and all(finished[t] - saved[t] <= 1 for t in saved), (finished, saved)
    assert summary is not None, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert summary.trials == 2 and summary.trials_failed == 0
    assert summary.trial_steps_total == 2 * steps
    # Each trial's new run went on from its checkpoint: no step redone, none skipped.
    assert continued_from == {t: saved[t] + 1 for t in saved}, (continued_from, saved)
    assert all(sorted(set(s)) == list(range(1, steps + 1)) for s in logged.values())
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
