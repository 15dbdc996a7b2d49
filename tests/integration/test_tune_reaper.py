"""The search removes the placement group of a Train run whose controller died with its
trial when Ray Train's own cleaner did not (`lmforge.tune.reaper`): a real Train run,
started from an actor as a Tune trial starts one, its cleaner killed, then its owner; and a
real search whose trial Tune stops while its run's cleaner is gone."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import cloudpickle
import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors

from lmforge.data import prepare_data
from lmforge.train.loop import StepInfo
from lmforge.tune import run_search
from lmforge.tune.reaper import orphaned_train_groups, reap_train_groups

from .helpers import wait_until

# The owner actor and the train function run in Ray workers: send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_forever(config: dict) -> None:
    Path(config["started"]).write_text("started")  # the run's group is registered by now
    threading.Event().wait()


@ray.remote(num_cpus=0)
class Trial:
    """Starts a Train run and holds it, as a Tune trial's actor does."""

    def start(self, storage: str, started: str) -> None:
        trainer = TorchTrainer(
            wait_forever, train_loop_config={"started": started},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="orphan", storage_path=storage))
        threading.Thread(target=trainer.fit, daemon=True).start()


def _alive(class_name: str) -> list:
    return list_actors(address=ray.get_runtime_context().gcs_address, timeout=20,
                       filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])


def _reserved() -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"}


def test_a_dead_controllers_group_left_by_its_cleaner_is_removed(ray_cluster, tmp_path):
    before = _reserved()
    started = tmp_path / "started"
    trial = Trial.remote()
    ray.get(trial.start.remote(str(tmp_path / "ray"), str(started)))
    wait_until(started.exists, "the Train run's worker started", timeout_s=300)
    (group,) = _reserved() - before
    assert orphaned_train_groups() == []  # its controller is alive: not an orphan

    # Ray Train's cleaner gone (as when its thread dies), then the trial's actor ended
    # (as Tune ends a trial ASHA stops): the controller dies with its owner.
    for cleaner in _alive("PlacementGroupCleaner"):
        os.kill(cleaner.pid, signal.SIGKILL)
    ray.kill(trial)
    wait_until(lambda: not _alive("TrainController"), "the controller died with its owner",
               timeout_s=120)
    assert group in _reserved()  # nobody else removes it
    assert orphaned_train_groups() == [group]

    assert reap_train_groups(settle_s=0) == [group]
    assert group not in _reserved()
    assert orphaned_train_groups() == []


def kill_cleaners(info: StepInfo) -> None:
    """Rank 0, step 1: SIGKILL every Ray Train `PlacementGroupCleaner` (the run's group is
    registered with its cleaner before training starts)."""
    if info.rank == 0 and info.step == 1:
        for cleaner in _alive("PlacementGroupCleaner"):
            os.kill(cleaner.pid, signal.SIGKILL)


@pytest.mark.long  # a search: ~35 s of make test's budget, with the searches in test-long
def test_a_search_removes_the_group_of_a_trial_tune_stopped(ray_cluster, tiny_spec,
                                                            tmp_path, capfd):
    # The token budget ends the search at its first report (step 20 of 60: 5,120 tokens),
    # and Tune ends the trial's actor, its Train controller with it.
    spec = tiny_spec("train.workers=1", "tune.num_trials=1", "tune.max_tokens=4000",
                     "tune.scheduler=fifo")
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    outcome = run_search(spec, data, None, "", name="reaped", step_hook=kill_cleaners)
    assert [t.status for t in outcome.trials] == ["STOPPED"]
    assert "removed 1 placement group(s) of Train runs" in capfd.readouterr().err
    # and the no-training-left guard finds nothing reserved
