"""Checkpoints in Hugging Face format: safetensors weights, config, tokenizer, plus the
training state (optimizer, step, RNG) needed to resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

STATE_FILE = "training_state.pt"
META_FILE = "trainer_state.json"


def save_checkpoint(directory: str | Path, model: PreTrainedModel, tokenizer_dir: str,
                    optimizer: torch.optim.Optimizer, step: int, metrics: dict,
                    attempt: int = 1) -> None:
    d = Path(directory)
    model.save_pretrained(d)  # safetensors + config.json
    shutil.copytree(tokenizer_dir, d, dirs_exist_ok=True)
    # Tensors and plain containers only, so resume loads with weights_only=True.
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
               d / STATE_FILE)
    (d / META_FILE).write_text(json.dumps({"step": step, "metrics": metrics,
                                           "attempt": attempt}))


def load_training_state(directory: str | Path, model: PreTrainedModel,
                        optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from a checkpoint; return its metadata: the
    `step` it was taken at, the `metrics` reported with it and the `attempt` that wrote it."""
    from safetensors.torch import load_file

    d = Path(directory)
    model.load_state_dict(load_file(d / "model.safetensors"), strict=False)
    model.tie_weights()
    state = torch.load(d / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return json.loads((d / META_FILE).read_text())
