"""A replica following `models:/NAME@ALIAS`: a version that fails to load is retried with
a doubling wait (the current version serving meanwhile), on a clock the test controls."""

from __future__ import annotations

import threading

import pytest

from lmforge.serve.follow import MAX_RETRY_WAIT_S, AliasFollower


class Registry:
    """Where the alias points, which versions fail to load, and what was loaded when."""

    def __init__(self) -> None:
        self.now, self.points_at, self.broken = 0.0, "models:/m/1", set()
        self.loads: list[tuple[float, str]] = []
        self.serving = "models:/m/1"

    def resolve(self, uri: str) -> str:
        assert uri == "models:/m@champion"
        return self.points_at

    def load(self, version: str) -> str:
        self.loads.append((self.now, version))
        if version in self.broken:
            raise OSError(f"{version}: no space left on device")
        return f"weights of {version}"

    def swap(self, loaded: str, version: str) -> None:
        assert loaded == f"weights of {version}"
        self.serving = version

    def follower(self, every_s: float = 10.0) -> AliasFollower:
        return AliasFollower("models:/m@champion", "models:/m/1", self.resolve, self.load,
                             self.swap, every_s, clock=lambda: self.now)

    def poll_until(self, follower: AliasFollower, end_s: float) -> None:
        while self.now < end_s:
            self.now += follower.every_s
            follower.check()


def test_a_version_that_fails_to_load_is_retried_ever_less_often_up_to_the_cap():
    registry = Registry()
    follower = registry.follower(every_s=10)
    registry.points_at, registry.broken = "models:/m/2", {"models:/m/2"}
    registry.poll_until(follower, 4 * 3600)
    tries = [t for t, _ in registry.loads]
    waits = [b - a for a, b in zip(tries, tries[1:], strict=False)]
    assert waits[:7] == [10, 20, 40, 80, 160, 320, MAX_RETRY_WAIT_S]
    assert set(waits[6:]) == {MAX_RETRY_WAIT_S}
    assert len(tries) < 30  # not one download per 10 s poll (1,440 in 4 hours)
    assert registry.serving == "models:/m/1" and follower.pinned == "models:/m/1"


def test_a_promotion_during_the_back_off_loads_at_the_next_poll_and_resets_it():
    registry = Registry()
    follower = registry.follower(every_s=10)
    registry.points_at, registry.broken = "models:/m/2", {"models:/m/2"}
    registry.poll_until(follower, 1000)
    registry.points_at = "models:/m/3"  # the fix is promoted
    registry.poll_until(follower, 1010)
    assert registry.loads[-1] == (1010, "models:/m/3") and registry.serving == "models:/m/3"
    registry.points_at = "models:/m/4"
    registry.broken.add("models:/m/4")
    registry.poll_until(follower, 1100)
    assert [t for t, v in registry.loads if v == "models:/m/4"] == [1020, 1030, 1050, 1090]


def test_a_registry_that_cannot_answer_is_asked_again_at_the_next_poll():
    registry = Registry()
    asked = []

    def resolve(uri: str) -> str:
        asked.append(registry.now)
        raise ConnectionError("registry down")

    follower = AliasFollower("models:/m@champion", "models:/m/1", resolve, registry.load,
                             registry.swap, 10, clock=lambda: registry.now)
    registry.poll_until(follower, 50)
    assert asked == [10, 20, 30, 40, 50] and not registry.loads


@pytest.mark.timeout(20)
def test_the_follower_thread_polls_until_stopped():
    registry = Registry()
    registry.points_at = "models:/m/2"
    swapped = threading.Event()
    follower = AliasFollower("models:/m@champion", "models:/m/1", registry.resolve,
                             registry.load, lambda loaded, v: swapped.set(), every_s=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,))
    thread.start()
    assert swapped.wait(10)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and follower.pinned == "models:/m/2"
