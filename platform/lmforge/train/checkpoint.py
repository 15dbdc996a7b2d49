"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One directory per checkpoint, which Ray Train uploads and registers only after every rank's
files are in storage (so a crash mid-write leaves an unregistered directory that resume
never picks; `trainer_state.json` is written last and checked on load as a second guard):

    config.json, tokenizer files      rank 0
    model.safetensors                 DDP, rank 0: a Hugging Face directory, ready to serve
    dcp/                              FSDP, every rank: its shards of model and optimizer
                                      (torch.distributed.checkpoint); `export_hf` turns them
                                      into one Hugging Face directory
    optimizer.pt                      DDP, rank 0: optimizer and grad-scaler state
    rng_rank{N}.pt                    every rank: its torch (and CUDA) RNG state
    trainer_state.json                rank 0: step, metrics, attempt, early-stopping state

`.pt` files hold tensors and plain containers only and load with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lmforge.train.parallel import Parallel

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
DCP_DIR = "dcp"


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint directory without its final marker: written by a crashed process."""


def save_checkpoint(directory: str | Path, model: torch.nn.Module, par: Parallel,
                    optimizer: torch.optim.Optimizer, rank: int, tokenizer_dir: str,
                    state: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into `directory` (a local temp dir that Ray
    Train merges with the other ranks' into one checkpoint in storage)."""
    d = Path(directory)
    raw = par.unwrap(model)
    if par.fsdp:
        # Collective: every rank writes its own shards (and rank 0 the metadata).
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=d / DCP_DIR)
    if rank == 0:
        if par.fsdp:
            raw.config.save_pretrained(d)
        else:
            raw.save_pretrained(d)  # model.safetensors + config.json
            torch.save({"optimizer": optimizer.state_dict()}, d / OPTIMIZER_FILE)
        shutil.copytree(tokenizer_dir, d, dirs_exist_ok=True)
    torch.save(_rng_state(par), d / f"rng_rank{rank}.pt")
    if rank == 0:
        state = state | {"scaler": par.scaler.state_dict() if par.scaler.is_enabled() else None}
        (d / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_checkpoint(directory: str | Path, model: torch.nn.Module, par: Parallel,
                    optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Restore weights, optimizer, grad scaler and this rank's RNG; return the trainer
    state (step, metrics, attempt, best_val_loss, evals_since_best)."""
    d = Path(directory)
    if not (d / STATE_FILE).exists():
        raise IncompleteCheckpoint(f"{d} has no {STATE_FILE}: it was never finished")
    state = json.loads((d / STATE_FILE).read_text())
    if par.fsdp:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=d / DCP_DIR)  # reshards if the world size changed
        set_state_dict(model, optimizer, model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])
    else:
        raw = par.unwrap(model)
        raw.load_state_dict(load_file(d / "model.safetensors", device=str(par.device)),
                            strict=False)
        raw.tie_weights()  # safetensors stores a tied weight once
        optimizer.load_state_dict(
            torch.load(d / OPTIMIZER_FILE, weights_only=True, map_location=par.device)
            ["optimizer"])
    if state.get("scaler"):
        par.scaler.load_state_dict(state["scaler"])
    rng = d / f"rng_rank{rank}.pt"
    if rng.exists():  # absent when resuming with more workers than the checkpoint had
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """One Hugging Face directory (safetensors, config, tokenizer) from any checkpoint: a
    copy for DDP, a gather of the FSDP shards (single process, no cluster needed) for FSDP.
    Written to a temp sibling and renamed, so `out_dir` is complete or absent."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if (src / DCP_DIR).is_dir():
            config = AutoConfig.from_pretrained(src)
            model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
            sd = {"model": model.state_dict()}
            dcp.load(sd, checkpoint_id=src / DCP_DIR)
            model.load_state_dict(sd["model"])
            model.tie_weights()
            model.save_pretrained(tmp)
            for f in src.iterdir():  # tokenizer and generation files
                if f.is_file() and not f.name.startswith(("rng_rank", "trainer_state", "config")):
                    shutil.copy2(f, tmp / f.name)
        else:
            for f in src.iterdir():
                if f.is_file() and f.name.endswith((".json", ".safetensors", ".txt", ".model")) \
                        and f.name != STATE_FILE:
                    shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _rng_state(par: Parallel) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if par.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(par.device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
