"""A worker killed mid-run: Ray Train restarts the group from the latest checkpoint, the
run finishes all its steps, and the result matches the uninterrupted run exactly."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ray.util.state import list_actors

from lmforge.data import prepare_data
from lmforge.tracking import RunTracker
from lmforge.train import run_training

# Long enough (a few seconds per 20 steps on 2 cores) to kill a worker between checkpoints.
SLOW = ["train.steps=400", "train.eval_every=40", "train.micro_batch_size=48",
        "train.warmup_steps=10"]


def _alive_workers() -> list[int]:
    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                ("state", "=", "ALIVE")])]


def test_killed_worker_resumes_from_checkpoint_and_matches(ray_cluster, tiny_spec,
                                                          tmp_path: Path):
    spec = tiny_spec(*SLOW, "train.max_failures=2", "tracking.run_name=interrupted")
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    storage = Path(spec.train.storage_path) / "interrupted"
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(
        result=run_training(spec, data, None, name="interrupted")))
    run.start()

    # Kill one worker once a second checkpoint directory appears: the first is then fully
    # reported, so the restart has it (bounded polling, not a sleep standing in for it).
    deadline = time.monotonic() + 180
    while len(list(storage.glob("checkpoint_*"))) < 2:
        assert time.monotonic() < deadline and run.is_alive(), "no checkpoint was written"
        time.sleep(0.2)
    victims = _alive_workers()
    assert victims, "no live training worker to kill"
    os.kill(victims[0], signal.SIGKILL)
    run.join(timeout=300)

    result = outcome["result"]
    assert result.steps == 400  # the full run, despite the dead worker
    assert result.attempts == 2
    assert 40 <= result.resumed_from_step < 400

    # The same spec uninterrupted: same data order, weights, optimizer and RNG after
    # resume, so the same validation loss (gloo all-reduce is deterministic on CPU).
    straight = run_training(tiny_spec(*SLOW, "tracking.run_name=straight"), data, None,
                            name="straight")
    assert straight.attempts == 1 and straight.resumed_from_step == 0
    assert abs(result.val_loss - straight.val_loss) < 1e-4, (result, straight)


def test_run_summary_records_attempts(ray_cluster, tiny_spec, tmp_path: Path):
    """The uninterrupted path through the pipeline reports one attempt from step 0."""
    from lmforge.pipeline import Stages, execute

    summary = execute(tiny_spec(), Stages(search=False, register=False, serve_check=False),
                      runs_dir=tmp_path)
    assert summary["attempts"] == 1 and summary["resumed_from_step"] == 0
    assert RunTracker(summary["tracking_uri"], summary["mlflow_run_id"]).status() == "FINISHED"
