"""The registry against a real MLflow store (no Ray): the promotion gate promotes a better
candidate and refuses a worse one, recording both figures; `lmforge promote` does the same
from the candidate's own lineage; concurrent registrations get consecutive READY versions.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import JobSpec, resolve_tracking_uri
from lmforge.data import BlockShard, PreparedData, prepare_data
from lmforge.model import build_model
from lmforge.registry import promote, register, spec_tag
from lmforge.tracking import RunTracker, experiment_id

NAME = "lmforge-gate"


@pytest.fixture
def setup(tiny_spec, tmp_path: Path):
    spec = tiny_spec(f"registry.model_name={NAME}")
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    uri = resolve_tracking_uri(spec.tracking, tmp_path)
    exp = experiment_id(uri, "gate", tmp_path / "mlartifacts")
    return spec, data, uri, exp


def checkpoint(spec: JobSpec, data: PreparedData, directory: Path, train_steps: int) -> str:
    """A Hugging Face directory of the tiny model, random or briefly trained."""
    torch.manual_seed(0)
    model = build_model(spec.model, data.vocab_size, data.eos_id)
    if train_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        shard = BlockShard(data, spec.model.block_size, 0, 1, 0, 16)
        for step in range(train_steps):
            x, y = shard.batch(step)
            F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(directory)
    data.tokenizer().save_pretrained(directory)
    return str(directory)


def register_version(spec, data, uri, exp, ckpt: str) -> int:
    run = RunTracker.start(uri, exp, "model")
    tags = {"lmforge.data_fingerprint": data.fingerprint, "lmforge.spec": spec_tag(spec)}
    return register(ckpt, run, spec.registry, tags, max_new_tokens=8).version


def test_gate_promotes_better_and_refuses_worse(setup, tmp_path: Path):
    spec, data, uri, exp = setup
    client = MlflowClient(uri)
    random_ckpt = checkpoint(spec, data, tmp_path / "random", train_steps=0)
    trained_ckpt = checkpoint(spec, data, tmp_path / "trained", train_steps=60)

    # No champion yet: the first candidate is promoted.
    v1 = register_version(spec, data, uri, exp, random_ckpt)
    first = promote(NAME, data, spec.registry, uri)
    assert first.promoted and first.champion_version is None
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == v1

    # A trained candidate beats the random champion by more than the margin.
    cfg = spec.registry.model_copy(update={"promote_margin": 0.05})
    v2 = register_version(spec, data, uri, exp, trained_ckpt)
    better = promote(NAME, data, cfg, uri)
    assert better.promoted and better.champion_version == v1
    assert better.candidate_loss < better.champion_loss - 0.05
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == v2
    tags = client.get_model_version(NAME, str(v2)).tags
    assert tags["lmforge.gate.decision"] == "promoted"
    assert float(tags["lmforge.gate.champion_loss"]) == pytest.approx(better.champion_loss,
                                                                      abs=1e-5)

    # A random candidate again: refused, champion stays, both figures on the version.
    v3 = register_version(spec, data, uri, exp, random_ckpt)
    runner = CliRunner()
    result = runner.invoke(app, ["promote", NAME, "--tracking-uri", uri,
                                 "registry.promote_margin=0.05"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout.strip().splitlines()[-1])
    assert decision["promoted"] is False and decision["candidate_version"] == v3
    assert decision["champion_version"] == v2
    assert decision["candidate_loss"] == pytest.approx(first.candidate_loss, abs=1e-4)
    assert decision["champion_loss"] == pytest.approx(better.candidate_loss, abs=1e-4)
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == v2
    tags = client.get_model_version(NAME, str(v3)).tags
    assert tags["lmforge.gate.decision"] == "refused"
    assert float(tags["lmforge.gate.candidate_loss"]) > float(tags["lmforge.gate.champion_loss"])
    assert tags["lmforge.gate.champion_version"] == str(v2)
    assert tags["lmforge.gate.margin"] == "0.05"

    # Errors name what is missing.
    missing = runner.invoke(app, ["promote", "no-such-model", "--tracking-uri", uri])
    assert missing.exit_code == 1 and "no-such-model" in missing.output


def test_concurrent_registrations_get_consecutive_ready_versions(setup, tmp_path: Path):
    spec, data, uri, exp = setup
    ckpt = checkpoint(spec, data, tmp_path / "model", train_steps=0)
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: register_version(spec, data, uri, exp, ckpt),
                                 range(4)))
    assert sorted(versions) == [1, 2, 3, 4]
    client = MlflowClient(uri)
    for v in versions:
        assert client.get_model_version(NAME, str(v)).status == "READY"
