"""registry.set_alias: a collision on the alias's unique key is retried, anything else
raised; load_model leaves no downloaded copy behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException

from lmforge.registry import load_model, set_alias


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


# --- load_model leaves no copy behind ----------------------------------------------------


@pytest.fixture
def artifact(tiny_model, char_tok, tmp_path: Path) -> Path:
    """A model laid out as MLflow's transformers flavor stores it."""
    root = tmp_path / "artifact"
    tiny_model.save_pretrained(root / "model")
    char_tok.save_pretrained(root / "components" / "tokenizer")
    return root


@pytest.fixture
def tmpdir_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory `tempfile` creates its directories in, for this test."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_the_downloaded_copy_is_removed_once_the_model_is_loaded(artifact, tmpdir_root,
                                                                 tiny_model):
    loaded = load_model(artifact.as_uri())
    assert list(tmpdir_root.iterdir()) == []
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the weights outlive their files
        assert torch.equal(loaded.model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_the_downloaded_copy_is_removed_when_the_load_fails(artifact, tmpdir_root):
    (artifact / "model" / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="not a valid JSON file"):
        load_model(artifact.as_uri())
    assert list(tmpdir_root.iterdir()) == []


def test_a_given_destination_keeps_the_copy(artifact, tmp_path):
    load_model(artifact.as_uri(), dst=str(tmp_path / "keep"))
    assert (tmp_path / "keep" / "artifact" / "model" / "config.json").exists()


# --- register keeps the run's status ------------------------------------------------------


@pytest.mark.parametrize("status", ["KILLED", "FINISHED"])
def test_registering_a_runs_model_keeps_the_status_it_ended_with(tiny_model, char_tok, tmp_path,
                                                                  status):
    """The best trial of a search its budget stopped early was closed KILLED; registering
    its model (through MLflow's fluent run, which ends FINISHED) must not make it FINISHED."""
    from lmforge.config import RegistryConfig
    from lmforge.registry import register
    from lmforge.tracking import RunTracker, experiment_id

    checkpoint = tmp_path / "checkpoint"
    tiny_model.save_pretrained(checkpoint)
    char_tok.save_pretrained(checkpoint)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker.start(uri, experiment_id(uri, "reg", tmp_path / "art"), "trial")
    tracker.finish(status)
    register(str(checkpoint), tracker, RegistryConfig(model_name="reg-tiny"), {},
             max_new_tokens=4)
    assert tracker.status() == status
