"""Which placement groups the search removes (`lmforge.tune.reaper`), read from a stand-in
for the GCS tables built of Ray's own protobuf records; the real GCS is
tests/integration/test_tune_reaper.py's."""

from __future__ import annotations

import pytest
from ray.core.generated import gcs_pb2

from lmforge.tune import reaper

PG, ACTOR = gcs_pb2.PlacementGroupTableData, gcs_pb2.ActorTableData


class Gcs:
    def __init__(self) -> None:
        self.groups: list[bytes] = []
        self.actors: dict[bytes, bytes] = {}

    def actor(self, n: int, class_name: str, state: int) -> bytes:
        actor_id = bytes([n]) * 16
        self.actors[actor_id] = ACTOR(actor_id=actor_id, class_name=class_name,
                                      state=state).SerializeToString()
        return actor_id

    def group(self, n: int, creator: bytes = b"", state: int = PG.CREATED,
              detached: bool = False) -> str:
        pg_id = bytes([n]) * 18
        self.groups.append(PG(placement_group_id=pg_id, creator_actor_id=creator, state=state,
                              is_detached=detached).SerializeToString())
        return pg_id.hex()

    def get_placement_group_table(self) -> list[bytes]:
        return self.groups

    def get_actor_info(self, actor_id) -> bytes | None:
        return self.actors.get(actor_id.binary())


def test_only_live_groups_of_dead_train_controllers_are_orphans():
    gcs = Gcs()
    dead = gcs.actor(1, "TrainController", ACTOR.DEAD)
    alive = gcs.actor(2, "TrainController", ACTOR.ALIVE)
    other = gcs.actor(3, "MyActor", ACTOR.DEAD)
    orphan = gcs.group(1, dead)
    second = gcs.group(2, dead)  # a restarted run's group, also left
    gcs.group(3, dead, state=PG.REMOVED)  # the cleaner did its work
    gcs.group(4, alive)  # a run still going
    gcs.group(5, other)  # another library's: not ours to judge
    gcs.group(6, dead, detached=True)
    gcs.group(7)  # a driver's (Tune's trial bundles)
    gcs.group(8, bytes([9]) * 16)  # creator no longer in the actor table
    assert reaper.orphaned_train_groups(gcs) == [orphan, second]


def test_an_ended_search_waits_for_its_controllers_and_removes_orphans(monkeypatch):
    now = [0.0]
    alive = iter([2, 1, 0])
    orphans = iter([[], ["aa"], ["bb"], []])
    monkeypatch.setattr(reaper, "orphaned_train_groups", lambda: next(orphans))
    monkeypatch.setattr(reaper, "live_train_controllers", lambda: next(alive))
    monkeypatch.setattr(reaper, "remove_groups", list)
    removed = reaper.reap_train_groups(settle_s=10, clock=lambda: now[0],
                                       wait=lambda s: now.__setitem__(0, now[0] + s))
    assert removed == ["aa", "bb"]
    assert now[0] == pytest.approx(2 * reaper.POLL_S)


def test_an_ended_search_gives_up_waiting_after_settle_s(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(reaper, "orphaned_train_groups", lambda: [])
    monkeypatch.setattr(reaper, "live_train_controllers", lambda: 1)  # a controller hangs
    assert reaper.reap_train_groups(settle_s=3, clock=lambda: now[0],
                                    wait=lambda s: now.__setitem__(0, now[0] + s)) == []
    assert now[0] == pytest.approx(3.0)


def test_a_gcs_that_does_not_answer_never_fails_the_search(monkeypatch, capsys):
    def down():
        raise ConnectionError("GCS unreachable")
    monkeypatch.setattr(reaper, "orphaned_train_groups", down)
    monkeypatch.setattr(reaper, "live_train_controllers", down)
    assert reaper.reap_train_groups(settle_s=30) == []
    assert "GCS unreachable" in capsys.readouterr().err
