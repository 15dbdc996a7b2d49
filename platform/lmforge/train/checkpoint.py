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

`.pt` files hold tensors and plain containers only and load with `weights_only=True`;
FSDP shards load through `_safe_dcp_load`, which does the same for what torch's own
reader would unpickle freely.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
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
        _safe_dcp_load(sd, d / DCP_DIR)  # reshards if the world size changed
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
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: not a training checkpoint (no config.json)")
    if not (src / STATE_FILE).exists():
        raise IncompleteCheckpoint(f"{src} has no {STATE_FILE}: it was never finished")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if (src / DCP_DIR).is_dir():
            config = AutoConfig.from_pretrained(src)
            model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
            sd = {"model": model.state_dict()}
            _safe_dcp_load(sd, src / DCP_DIR)
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


# --- loading torch distributed checkpoints without unpickling arbitrary objects -------
# torch's FileSystemReader unpickles `.metadata` with plain pickle, and DefaultLoadPlanner
# loads non-tensor entries (the optimizer's hyperparameters) with weights_only=False:
# either runs code planted in a checkpoint. Written here because torch has no safe mode.

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",
                     "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("pathlib", "PosixPath"), ("pathlib", "Path"),
                     ("collections", "OrderedDict")}


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file asked to load something other than checkpoint data."""


class _MetadataUnpickler(pickle.Unpickler):
    """Checkpoint metadata only: DCP's own dataclasses and enums, torch dtypes and sizes."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _METADATA_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpoint(f"checkpoint metadata refers to {module}.{name}, which is not "
                               "checkpoint data: refusing to load it")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{self.path}: .metadata is not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: Any) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _safe_dcp_load(state_dict: dict[str, Any], path: Path) -> None:
    dcp.load(state_dict, storage_reader=_SafeReader(path), planner=_SafePlanner())
