"""A latest checkpoint that fails to load is set aside and an older kept one is used.

Real checkpoints written by `save_checkpoint`, then damaged the way a crash or a full disk
damages them (a truncated safetensors file, a missing file, a missing weight); no Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig, TrainConfig
from lmforge.model import build_model
from lmforge.train.checkpoint import (
    SET_ASIDE_FILE,
    CorruptCheckpoint,
    checkpoint_dir_name,
    load_checkpoint,
    resume_from,
    save_checkpoint,
    set_aside,
    set_aside_reason,
)
from lmforge.train.parallel import Parallel
from lmforge.train.step import make_optimizer
from lmforge.train.trainer import best_intact

TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=16)
PAR = Parallel(TrainConfig(), torch.device("cpu"))


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model(TINY, 50, 0)
    return model, make_optimizer(model, TrainConfig())


@pytest.fixture
def run(tmp_path: Path, tokenizer_dir: str) -> dict[int, Checkpoint]:
    """A run with checkpoints at steps 10, 20 and 30 (weights differ at each)."""
    out = {}
    for step in (10, 20, 30):
        model, opt = model_and_optimizer(seed=step)
        d = tmp_path / "run" / checkpoint_dir_name(step, [])
        save_checkpoint(d, model, PAR, opt, 0, tokenizer_dir,
                        {"step": step, "attempt": 1, "metrics": {"val_loss": 3.0 - step / 10}})
        out[step] = Checkpoint(str(d))
    return out


def resume(run: dict[int, Checkpoint], latest: int = 30, agree=lambda e: [e]):
    model, opt = model_and_optimizer(seed=0)
    warnings: list[str] = []
    asked: list[str] = []

    def load(c: Checkpoint) -> dict:
        asked.append(Path(c.path).name)
        return load_checkpoint(c.path, model, PAR, opt, rank=0)

    older = [run[s] for s in sorted(run, reverse=True)]
    resumed = resume_from(run[latest], lambda: older, load, agree, 0, warnings.append)
    return resumed, model, warnings, asked


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def weights_of(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return load_file(Path(ckpt.path) / "model.safetensors")


def test_intact_latest_checkpoint_is_used_and_nothing_is_set_aside(run):
    resumed, _, warnings, asked = resume(run)
    assert resumed.state["step"] == 30 and resumed.set_aside == [] and warnings == []
    assert asked == ["checkpoint_0000030"]
    assert not any((Path(c.path) / SET_ASIDE_FILE).exists() for c in run.values())


def test_truncated_weights_fall_back_to_the_previous_checkpoint(run):
    latest = Path(run[30].path)
    truncate(latest / "model.safetensors")
    resumed, model, warnings, _ = resume(run)

    assert resumed.state["step"] == 20
    assert Path(resumed.checkpoint.path).name == "checkpoint_0000020"
    for name, tensor in weights_of(run[20]).items():  # the weights really are step 20's
        assert torch.equal(model.state_dict()[name], tensor), name
    # Set aside with its reason, not deleted: the damaged file is still there to inspect.
    assert (latest / "model.safetensors").exists()
    marker = json.loads((latest / SET_ASIDE_FILE).read_text())
    assert "SafetensorError" in marker["reason"] and "rank 0" in marker["reason"]
    assert resumed.set_aside == ["checkpoint_0000030"]
    assert len(warnings) == 1 and "checkpoint_0000030" in warnings[0]
    assert "resuming from checkpoint_0000020" in warnings[0]


def test_missing_weight_is_refused_by_strict_loading(run):
    path = Path(run[30].path) / "model.safetensors"
    weights = load_file(path)
    del weights["transformer.h.0.mlp.c_fc.weight"]
    save_file(weights, path, metadata={"format": "pt"})

    resumed, _, _, _ = resume(run)
    assert resumed.state["step"] == 20
    reason = set_aside_reason(run[30])
    assert "Missing key" in reason and "transformer.h.0.mlp.c_fc.weight" in reason


def test_missing_optimizer_file_falls_back(run):
    (Path(run[30].path) / "optimizer.pt").unlink()
    assert resume(run)[0].state["step"] == 20


def test_two_damaged_checkpoints_fall_back_two_steps(run):
    truncate(Path(run[30].path) / "model.safetensors")
    (Path(run[20].path) / "trainer_state.json").unlink()
    resumed, _, warnings, _ = resume(run)
    assert resumed.state["step"] == 10
    assert resumed.set_aside == ["checkpoint_0000030", "checkpoint_0000020"]
    assert set_aside_reason(run[20]) is not None and len(warnings) == 2


def test_a_checkpoint_set_aside_earlier_is_skipped_without_loading(run):
    set_aside(run[30], "truncated, found by an earlier attempt")
    resumed, _, warnings, asked = resume(run)
    assert asked == ["checkpoint_0000020"] and resumed.state["step"] == 20
    assert warnings == []  # already said when it was set aside
    assert set_aside_reason(run[30]) == "truncated, found by an earlier attempt"
    assert resumed.set_aside == ["checkpoint_0000030"]


def test_when_no_checkpoint_loads_none_is_set_aside(run):
    """A model changed since the run started fails every checkpoint: refuse, naming why,
    rather than mark them all and silently train from scratch."""
    for ckpt in run.values():
        truncate(Path(ckpt.path) / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="no kept checkpoint of this run loads") as info:
        resume(run)
    for step in (30, 20, 10):
        assert f"checkpoint_{step:07d}: rank 0: SafetensorError" in str(info.value)
    assert not any((Path(c.path) / SET_ASIDE_FILE).exists() for c in run.values())


def test_all_ranks_move_on_when_one_rank_cannot_load(run):
    """Rank 0 loaded the latest, rank 1 did not: both use the previous one."""
    calls = []

    def agree(value):  # rank 1's side of each collective: set aside?, then its load error
        calls.append(value)
        rank1 = "OSError: rng_rank1.pt: short read" if len(calls) == 2 else None
        return [value, rank1]

    resumed, _, _, asked = resume(run, agree=agree)
    assert asked == ["checkpoint_0000030", "checkpoint_0000020"]
    assert resumed.state["step"] == 20
    assert set_aside_reason(run[30]) == "rank 1: OSError: rng_rank1.pt: short read"


def test_older_checkpoints_are_listed_only_when_the_latest_fails(run):
    model, opt = model_and_optimizer(seed=0)

    def older():
        raise AssertionError("listed the kept checkpoints though the latest loaded")

    resumed = resume_from(run[30], older, lambda c: load_checkpoint(c.path, model, PAR, opt, 0),
                          lambda e: [e], 0, print)
    assert resumed.state["step"] == 30


def test_new_checkpoints_do_not_reuse_a_set_aside_name():
    assert checkpoint_dir_name(200, []) == "checkpoint_0000200"
    assert checkpoint_dir_name(200, ["checkpoint_0000200"]) == "checkpoint_0000200-2"
    assert checkpoint_dir_name(
        200, ["checkpoint_0000200", "checkpoint_0000200-2"]) == "checkpoint_0000200-3"


def test_best_checkpoint_skips_a_set_aside_one(run):
    reported = [(run[s], {"val_loss": 3.0 - s / 10}) for s in (10, 20, 30)]
    assert best_intact(reported) is run[30]
    set_aside(run[30], "truncated")
    assert best_intact(reported) is run[20]
    set_aside(run[20], "truncated")
    set_aside(run[10], "truncated")
    assert best_intact(reported) is None
