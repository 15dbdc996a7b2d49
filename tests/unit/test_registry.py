"""registry.set_alias: a collision on the alias's unique key is retried, anything else raised."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from lmforge.registry import set_alias


class FlakyClient:
    """Fails the first `collisions` alias writes the way MLflow's SQL store does."""

    def __init__(self, collisions: int, message: str = "(sqlite3.IntegrityError) UNIQUE "
                 "constraint failed: registered_model_aliases.alias"):
        self.collisions, self.message, self.calls = collisions, message, []

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.calls.append((name, alias, version))
        if len(self.calls) <= self.collisions:
            raise MlflowException(self.message)


def test_collision_is_retried_until_the_alias_is_set():
    client = FlakyClient(collisions=2)
    set_alias(client, "m", "candidate", 7)
    assert client.calls == [("m", "candidate", "7")] * 3


def test_persistent_collision_is_raised_after_the_attempts():
    client = FlakyClient(collisions=10)
    with pytest.raises(MlflowException, match="UNIQUE"):
        set_alias(client, "m", "candidate", 7, attempts=3)
    assert len(client.calls) == 3


def test_other_errors_are_not_retried():
    client = FlakyClient(collisions=1, message="RESOURCE_DOES_NOT_EXIST: version 7")
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        set_alias(client, "m", "candidate", 7)
    assert len(client.calls) == 1
