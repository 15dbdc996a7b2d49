"""The placement groups of Train runs whose controller has died, removed by the search.

Tune ends a trial (ASHA stopping it at a rung) by ending the trial's actor, and the Train
controller that actor started dies with it (Ray ends an actor with its owner) without
removing its workers' placement group. Ray keeps such a group while the job that made it
lives, which for a search is its driver: the group's CPUs stay reserved, and the next trial
waits for its workers forever (WorkerGroupStartupTimeoutError every 60 s).

Ray Train starts a `PlacementGroupCleaner` per run to remove it: a detached actor whose
thread polls the dashboard's State API for its controller. It has no second chance: if the
controller dies before registering its group, if the thread stops on an error its loop does
not catch, if the State API does not answer, or if one removal fails, the group stays
reserved. CI's `make test-long`
once found a group 60 s after a search with no Train actor alive (docs/testing.md). So the
search removes them too (`ReapTrainGroups` while it runs, `reap_train_groups` once it has
ended), by the cleaner's own rule, a run's group is free once its controller is dead, read
from the GCS rather than the dashboard: each group's creator actor and that actor's state.

Written by hand: Ray has no public API that names a placement group's creator, so this
reads the GCS tables through `ray._private.state`, as `ray.util.placement_group_table` does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import ray
from ray import tune
from ray.core.generated import gcs_pb2

TRAIN_CONTROLLER = "TrainController"  # Ray Train V2's controller actor class
REAP_EVERY_S = 5.0  # how often a running search looks for orphaned groups
SETTLE_S = 30.0  # how long an ended search waits for its trials' controllers to die
POLL_S = 0.5

_PG = gcs_pb2.PlacementGroupTableData
_ACTOR = gcs_pb2.ActorTableData


class GcsTables(Protocol):
    """What is read of the GCS: `ray._private.state.state._connect_and_get_accessor()`."""

    def get_placement_group_table(self) -> Iterable[bytes]: ...
    def get_actor_info(self, actor_id: Any) -> bytes | None: ...
    def get_actor_table(self, job_id: Any, actor_state_name: str | None) -> Iterable[bytes]: ...


def _gcs() -> GcsTables:
    return ray._private.state.state._connect_and_get_accessor()


def orphaned_train_groups(gcs: GcsTables | None = None) -> list[str]:
    """Hex ids of the reserved placement groups whose creator is a dead Train controller:
    no one can use them any more (the run's workers died with their controller)."""
    gcs = gcs or _gcs()
    creators: dict[bytes, bool] = {}
    found = []
    for raw in gcs.get_placement_group_table():
        group = _PG.FromString(raw)
        if group.state == _PG.REMOVED or group.is_detached or not group.creator_actor_id:
            continue  # a driver's group (Tune's trial bundles) is the driver's to remove
        creator = group.creator_actor_id
        if creator not in creators:
            info = gcs.get_actor_info(ray.ActorID(creator))
            actor = _ACTOR.FromString(info) if info is not None else None
            creators[creator] = actor is not None and actor.class_name == TRAIN_CONTROLLER \
                and actor.state == _ACTOR.DEAD
        if creators[creator]:
            found.append(group.placement_group_id.hex())
    return found


def remove_groups(ids: Iterable[str]) -> list[str]:
    """Remove the placement groups `ids`, saying so on stderr; returns those removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for pg_id in ids:
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
        except Exception as e:  # gone meanwhile, or the GCS busy: the next pass retries
            print(f"[lmforge] could not remove placement group {pg_id} of an ended Train "
                  f"run: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        removed.append(pg_id)
    if removed:
        print(f"[lmforge] removed {len(removed)} placement group(s) of Train runs whose "
              f"controller had died with its trial ({', '.join(removed)}): Ray Train's "
              "cleaner had left them reserved", file=sys.stderr, flush=True)
    return removed


def live_train_controllers(gcs: GcsTables | None = None) -> int:
    """How many Train controllers of this driver's job are alive."""
    gcs = gcs or _gcs()
    job = ray.get_runtime_context().get_job_id()
    return sum(_ACTOR.FromString(raw).class_name == TRAIN_CONTROLLER
               for raw in gcs.get_actor_table(ray.JobID.from_hex(job), "ALIVE"))


def reap_once() -> list[str]:
    """Remove the orphaned Train groups there are now; never raises (Ray Train's cleaner
    may yet remove them, and a search must not fail over it)."""
    try:
        return remove_groups(orphaned_train_groups())
    except Exception as e:
        print(f"[lmforge] could not look for orphaned placement groups: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return []


def reap_train_groups(settle_s: float = SETTLE_S,
                      clock: Callable[[], float] = time.monotonic,
                      wait: Callable[[float], None] = time.sleep) -> list[str]:
    """Once a search has ended: wait (up to `settle_s`) for the Train controllers of its
    trials to die, as each ended trial's actor takes its controller with it, removing
    every orphaned group as it appears. Returns the groups removed."""
    removed: list[str] = []
    deadline = clock() + settle_s
    while True:
        removed += reap_once()
        try:
            settled = not live_train_controllers()
        except Exception:  # reap_once has said why the GCS did not answer
            settled = True
        if settled or clock() >= deadline:
            return removed + reap_once()
        wait(POLL_S)


class ReapTrainGroups(tune.Callback):
    """While a search runs, every `every_s` seconds, remove the groups of Train runs whose
    controller died with its trial: the next trials need those CPUs."""

    def __init__(self, every_s: float = REAP_EVERY_S) -> None:
        self.every_s = every_s
        self._next = 0.0

    def setup(self, **info: Any) -> None:
        self._next = 0.0  # a restored search's clock is another process's

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every_s
            reap_once()
