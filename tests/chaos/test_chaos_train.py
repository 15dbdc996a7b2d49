"""Training under faults: the MLflow server stopped in the middle of a 2-worker run, and
SIGTERM to `lmforge train` followed by `--resume`. Nothing may be lost: the step rate holds
through the outage and MLflow gets the metrics from during and after it; a preempted run
keeps every step it finished."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from lmforge.config import load
from lmforge.pipeline import Stages, Summary, execute
from lmforge.runs import NamedRun
from lmforge.tracking import RunTracker
from lmforge.train.loop import DRAIN_S
from lmforge.train.preempt import EXIT_CODE

from ..integration.helpers import (
    SPEC,
    file_size,
    lmforge,
    own_cluster_env,
    wait_until,
)
from ..ray_fixtures import MlflowServer

pytestmark = pytest.mark.chaos

TRAIN_ONLY = Stages(search=False, register=False, serve_check=False)
STALL_S = 180  # a training command prints a line per step: this long silent is stuck


def state(tmp: Path, *extra: str) -> list[str]:
    """Overrides putting every piece of state under `tmp`."""
    return [f"data.cache_dir={tmp / 'cache'}", f"train.storage_path={tmp / 'ray'}", *extra]


def rates(points: list[tuple[float, int]], start: float, end: float) -> list[float]:
    """Steps per second between consecutive (time, step) points inside [start, end]
    (seconds since the epoch): one rate per logging interval."""
    inside = [(t, s) for t, s in points if start <= t <= end]
    assert len(inside) >= 10, f"{len(inside)} points in [{start:.1f}, {end:.1f}]"
    return [(s1 - s0) / (t1 - t0) for (t0, s0), (t1, s1) in pairwise(inside) if t1 > t0]


def gaps(points: list[tuple[float, int]], start: float, end: float) -> list[float]:
    """Seconds between consecutive points inside [start, end]."""
    inside = [t for t, _ in points if start <= t <= end]
    return [t1 - t0 for t0, t1 in pairwise(inside)]


def test_an_mlflow_outage_neither_slows_nor_stops_training(
        ray_cluster: str, mlflow_service: MlflowServer, tmp_path: Path, chaos_scale: float,
        chaos_result):
    """The rate during the outage against the rate in the window right before it (as
    long, up to 30 s), each the median of its 10-step intervals' rates.

    Why not steps / time over each window, as before: that counts every stall, and on the
    shared 2-core machine (load 17 to 21 from other work) stalls of 0.1 to 0.7 s hit both
    ranks at random steps with and without an outage (1.0 s of them in 10 s before one
    outage, 4.0 s in the 20 s during it), as do the evaluations and checkpoints that fall
    in one window and not the other; a run with no outage at all measured 1.31 between
    the old windows. The median ignores those and moves with anything the outage does to
    every step (the loop waiting for MLflow, CPU spent retrying); a wait at an evaluation
    (`drain`) would show as a gap of `DRAIN_S`, checked on its own. What no statistic
    removes is other work starting or stopping between the two windows (the no-outage
    run's medians differed by 1.27x): CI runs nothing else beside the suite."""
    outage_s = 20 * chaos_scale
    before_s = min(outage_s, 30.0)
    # The tiny model runs 35 to 131 steps/s on a 2-core machine, with the load and without
    # (131 on 2026-12-05, quiet: at the 90 steps/s this was sized for, the run ended
    # during the outage, and nothing was measured after the restart): enough steps for
    # the window before the outage, the outage, and the server's restart (seconds of CPU)
    # at up to 160 steps/s (a metric point every 10 steps; a slower machine takes longer).
    steps = 400 + int(160 * (before_s + outage_s + 12)) // 10 * 10
    spec = load(SPEC, state(tmp_path, f"tracking.uri={mlflow_service.url}",
                            f"train.steps={steps}", f"train.eval_every={steps // 4}",
                            "train.log_every=10", "tracking.run_name=outage"))
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = execute(spec, TRAIN_ONLY, runs_dir=tmp_path)
        except BaseException as e:  # reported by the asserts below
            outcome["error"] = e

    run = threading.Thread(target=train, daemon=True)
    run.start()
    named = NamedRun.of(spec, search=False)
    tracker = wait_until(lambda: RunTracker(spec.tracking.uri, named.state().parent_run_id)
                         if named.started() else None, "the run's MLflow run",
                         timeout_s=300, interval_s=0.5)
    logged = lambda: sorted((m.timestamp / 1000, m.step) for m in  # noqa: E731
                            tracker.client.get_metric_history(tracker.run_id, "train_loss"))
    # Past the first steps' warm-up, then stepping for the window before the outage.
    warm = wait_until(lambda: next((t for t, s in logged() if s >= 50), None), "step 50",
                      progress=lambda: len(logged()), stall_s=STALL_S, interval_s=0.5)
    wait_until(lambda: max(t for t, _ in logged()) >= warm + before_s,
               f"{before_s:.0f} s of steps logged", progress=lambda: len(logged()),
               stall_s=STALL_S, interval_s=0.5)

    down = time.time()
    mlflow_service.stop()
    time.sleep(outage_s)  # the fault's duration, not a wait for readiness
    restarting = time.time()  # the server's start takes seconds of CPU from training
    mlflow_service.start()
    back = time.time()
    assert run.is_alive(), f"the run ended during the outage: {outcome}"
    run.join(timeout=600)
    assert not run.is_alive(), "the run did not end within 600 s of the outage"

    points = logged() if "summary" in outcome else []
    summary: Summary | None = outcome.get("summary")
    window = (max(warm, down - before_s), down), (down + 1, restarting)
    before = statistics.median(rates(points, *window[0])) if points else 0.0
    during = statistics.median(rates(points, *window[1])) if points else 0.0
    longest = max(gaps(points, *window[1]), default=0.0)
    logged_after = [s for t, s in points if t > restarting]  # measured once it was over
    expected = set(range(10, steps + 1, 10))
    missing = expected - {s for _, s in points}
    chaos_result("MLflow server stopped mid-run",
                 load=f"2-worker DDP run, {steps} steps, a metric point every 10 steps",
                 faults=f"mlflow server SIGKILLed for {outage_s:.0f} s, then restarted",
                 lost=f"{len(missing)} of {len(expected)} train_loss points, "
                      f"{summary.tracking_dropped if summary else '?'} values dropped",
                 steps_per_s_before=before, steps_per_s_during=during,
                 ratio=during / before if before else 0.0, longest_gap_during_s=longest,
                 restart_s=back - restarting)

    assert "error" not in outcome, outcome.get("error")
    assert summary is not None and summary.steps == steps
    assert summary.tracking_dropped == 0
    assert during >= 0.8 * before, (before, during)  # stepping on at its normal rate
    assert longest < DRAIN_S, longest  # and never held at an evaluation waiting for MLflow
    assert logged_after and max(logged_after) == steps, (back, points[-3:])  # after it
    assert not missing, sorted(missing)[:20]  # and from during it, sent once it was back
    assert tracker.status() == "FINISHED"


def test_sigterm_checkpoints_at_the_next_step_and_resume_finishes(
        tmp_path: Path, chaos_scale: float, chaos_result):
    steps = int(400 * chaos_scale)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", str(SPEC), *state(tmp_path, f"tracking.uri={uri}", f"train.steps={steps}",
                                       "train.eval_every=100", "train.log_every=1",
                                       "tracking.run_name=preempted")]
    log = tmp_path / "first.log"
    printed = lambda: [int(line.split("[lmforge] step ")[1].split("/")[0])  # noqa: E731
                       for line in log.read_text().splitlines() if "[lmforge] step " in line]
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=tmp_path,
                                  env=own_cluster_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        # Between checkpoints (every 100 steps), so one at the signal is the only one near.
        wait_until(lambda: max(printed(), default=0) >= steps // 2 + 30
                   or driver.poll() is not None, "training half-way",
                   progress=lambda: file_size(log), stall_s=STALL_S, interval_s=0.05)
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.send_signal(signal.SIGTERM)  # the driver alone, as `kill PID` does
        at_signal = max(printed())
        rc = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    checkpoints = sorted(int(p.name.split("_")[1])
                         for p in (tmp_path / "ray" / "preempted").glob("checkpoint_*")
                         if p.is_dir())
    saved = max(checkpoints, default=0)
    finished = max(printed())  # the last step the first run completed
    named = NamedRun.of(load(SPEC, args[2:]), search=False)
    first = RunTracker(uri, named.state().parent_run_id)
    first_status = first.status()

    resumed = lmforge("train", "--resume", *args[1:], cwd=tmp_path, stall_s=STALL_S)
    summary = Summary(**json.loads(resumed.stdout.strip().splitlines()[-1])) \
        if resumed.returncode == 0 else None
    logged = {s for s, _ in first.metric_history("train_loss")}
    chaos_result("SIGTERM to lmforge train, then --resume",
                 load=f"2-worker DDP run, {steps} steps, checkpoints every 100",
                 faults=f"SIGTERM to the driver at step {at_signal}",
                 lost=f"{finished - saved} steps (finished {finished}, checkpoint {saved})",
                 signal_step=at_signal, checkpoint_step=saved,
                 steps_after_signal=saved - at_signal)

    assert rc == EXIT_CODE, text[-3000:]
    assert "stopped by SIGTERM after step" in text
    assert saved >= at_signal, checkpoints  # a checkpoint where it stopped
    assert finished - saved <= 1  # at most one step of work lost (here: none)
    assert first_status == "KILLED"
    assert summary is not None, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert summary.steps == steps and summary.resumed_from_step == saved
    assert summary.attempts == 2
    assert logged == set(range(1, steps + 1))  # every step's loss, in the one MLflow run
    assert first.status() == "FINISHED"
