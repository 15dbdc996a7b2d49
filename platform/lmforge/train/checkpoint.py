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
    adapter_model.safetensors,        LoRA (any strategy), rank 0: the adapter only, and
    adapter_config.json, optimizer.pt   its optimizer state; the base is `model.pretrained`
    rng_rank{N}.pt                    every rank: its torch (and CUDA) RNG state
    trainer_state.json                rank 0: step, metrics, attempt, early-stopping state
    SET_ASIDE.json                    written later, only to a checkpoint that failed to load:
                                      why; it stays where it is (not deleted) and is skipped

A latest checkpoint that fails to load (truncated or missing files, weights that do not
match the model) is set aside and the next newest kept one is used (`resume_from`); every
rank uses the same one.
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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lmforge.train.lora import (
    base_of,
    is_adapter_checkpoint,
    is_lora,
    load_adapter,
    merge,
    save_adapter,
)
from lmforge.train.parallel import Parallel

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
DCP_DIR = "dcp"
SET_ASIDE_FILE = "SET_ASIDE.json"


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint directory without its final marker: written by a crashed process."""


class CorruptCheckpoint(RuntimeError):
    """No kept checkpoint of a run could be loaded."""


def save_checkpoint(directory: str | Path, model: torch.nn.Module, par: Parallel,
                    optimizer: torch.optim.Optimizer, rank: int, tokenizer_dir: str,
                    state: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into `directory` (a local temp dir that Ray
    Train merges with the other ranks' into one checkpoint in storage)."""
    d = Path(directory)
    raw = par.unwrap(model)
    if is_lora(par.cfg):
        # The adapter only (and its optimizer state): the base comes back from
        # `model.pretrained` on a restart, as it did at the start.
        save_adapter(d, model, optimizer, raw, rank, OPTIMIZER_FILE)
    elif par.fsdp:
        # Collective: every rank writes its own shards (and rank 0 the metadata).
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=d / DCP_DIR)
    if rank == 0:
        if is_lora(par.cfg):
            pass  # config.json and optimizer.pt written with the adapter
        elif par.fsdp:
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
    if is_lora(par.cfg):
        if not is_adapter_checkpoint(d):
            raise ValueError(f"{d} holds a whole model, not an adapter: it was written by a "
                             "run with another train.method")
        trained_on, base = base_of(d), par.unwrap(model).peft_config["default"] \
            .base_model_name_or_path
        if trained_on != base:
            raise ValueError(f"{d}: its adapter was trained on {trained_on!r}, this run's "
                             f"model.pretrained is {base!r}")
        load_adapter(d, model, optimizer, par.device, OPTIMIZER_FILE)
    elif par.fsdp:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        _safe_dcp_load(sd, d / DCP_DIR)  # reshards if the world size changed
        set_state_dict(model, optimizer, model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])
    else:
        raw = par.unwrap(model)
        raw.load_state_dict(_with_tied(raw, load_file(d / "model.safetensors",
                                                      device=str(par.device))), strict=True)
        optimizer.load_state_dict(
            torch.load(d / OPTIMIZER_FILE, weights_only=True, map_location=par.device)
            ["optimizer"])
    if state.get("scaler"):
        par.scaler.load_state_dict(state["scaler"])
    rng = d / f"rng_rank{rank}.pt"
    if rng.exists():  # absent when resuming with more workers than the checkpoint had
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


def _with_tied(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` plus the tied weights safetensors stored once (GPT-2's lm_head is wte), so that
    loading can be strict: any other missing or unexpected key is an error, not a silently
    random weight."""
    params = model.state_dict()
    by_storage = {t.data_ptr(): k for k, t in params.items() if k in sd}
    tied = {k: sd[by_storage[t.data_ptr()]] for k, t in params.items()
            if k not in sd and t.data_ptr() in by_storage}
    return sd | tied


# --- choosing the checkpoint a restart resumes from -------------------------------------


class StoredCheckpoint(Protocol):
    """A checkpoint in storage, as Ray Train's `Checkpoint` gives it."""
    path: str
    filesystem: pafs.FileSystem


def checkpoint_name(ckpt: StoredCheckpoint) -> str:
    return ckpt.path.rstrip("/").rsplit("/", 1)[-1]


def set_aside_reason(ckpt: StoredCheckpoint) -> str | None:
    """Why this checkpoint was set aside, or None when it was not."""
    marker = f"{ckpt.path.rstrip('/')}/{SET_ASIDE_FILE}"
    if ckpt.filesystem.get_file_info(marker).type == pafs.FileType.NotFound:
        return None
    with ckpt.filesystem.open_input_stream(marker) as f:
        text = f.read().decode(errors="replace")
    try:
        return str(json.loads(text)["reason"])
    except (ValueError, KeyError, TypeError):  # a marker cut short is still a marker
        return text or "(empty marker)"


def set_aside(ckpt: StoredCheckpoint, reason: str) -> None:
    """Mark a checkpoint that failed to load: its files stay (to inspect, or to repair by
    hand: delete SET_ASIDE.json to use it again); every later load skips it. Not renamed:
    Ray Train's checkpoint list refers to it by its name and refuses a run whose listed
    checkpoints are gone."""
    marker = f"{ckpt.path.rstrip('/')}/{SET_ASIDE_FILE}"
    with ckpt.filesystem.open_output_stream(marker) as f:
        f.write(json.dumps({"reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                           indent=2).encode())


@dataclass
class Resumed:
    """What `resume_from` chose."""
    checkpoint: StoredCheckpoint
    state: dict[str, Any]
    set_aside: list[str] = field(default_factory=list)
    """Names of the newer checkpoints skipped because they do not load (new checkpoints
    must not reuse these names: Ray would write into the set-aside directory)."""


def resume_from(latest: StoredCheckpoint, older: Callable[[], Sequence[StoredCheckpoint]],
                load: Callable[[StoredCheckpoint], dict[str, Any]],
                agree: Callable[[str | None], list[str | None]],
                rank: int, warn: Callable[[str], None]) -> Resumed:
    """Load the newest checkpoint that loads on every rank: `latest` (what Ray Train hands
    a restarted worker group), else the others in `older()` (the run's kept checkpoints),
    newest first.

    `load` restores one checkpoint into this rank's model and optimizer and returns the
    trainer state; `agree` gathers one value from every rank (a collective), here whether
    the checkpoint was set aside and then each rank's error (None when it loaded), so all
    ranks move on together even when only one rank's files are damaged. Checkpoints that failed
    are set aside (by rank 0) once an older one loads in their place; when none loads, none
    is set aside and `CorruptCheckpoint` says why each failed (a model changed since the
    run started fails every checkpoint: that is no reason to train from scratch).
    """
    def candidates() -> Iterator[StoredCheckpoint]:
        yield latest
        yield from (c for c in older() if c.path != latest.path)  # asked only if needed

    failed: list[tuple[StoredCheckpoint, str, bool]] = []  # (checkpoint, why, marked)
    for ckpt in candidates():
        # Whether it was set aside before, agreed first: a rank that skipped it while
        # another loaded it would leave that one alone in FSDP's collective load.
        earlier = next((r for r in agree(set_aside_reason(ckpt)) if r is not None), None)
        if earlier is not None:
            failed.append((ckpt, f"set aside earlier: {earlier}", True))
            continue
        error: str | None = None
        try:
            state = load(ckpt)
        except Exception as e:  # any failure to read it: an older one may load
            error = f"{type(e).__name__}: {e}"[:1000]
        errors = agree(error)
        if all(e is None for e in errors):
            for skipped, reason, marked in failed:
                if rank == 0 and not marked:
                    set_aside(skipped, reason)
                    warn(f"checkpoint {checkpoint_name(skipped)} does not load ({reason}); "
                         f"set aside (marked with {SET_ASIDE_FILE}, not deleted), resuming "
                         f"from {checkpoint_name(ckpt)}")
            return Resumed(ckpt, state, [checkpoint_name(c) for c, _, _ in failed])
        failed.append((ckpt, "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors)
                                       if e is not None), False))
    reasons = "; ".join(f"{checkpoint_name(c)}: {r}" for c, r, _ in failed)
    raise CorruptCheckpoint(f"no kept checkpoint of this run loads ({reasons}). If the model "
                            "or strategy changed since the run started, resume with the "
                            "spec it started with, or start a new run")


def checkpoint_dir_name(step: int, taken: Sequence[str]) -> str:
    """`checkpoint_0000200`, or with a suffix when a set-aside checkpoint has that name."""
    name = f"checkpoint_{step:07d}"
    n = 2
    while name in taken:
        name, n = f"checkpoint_{step:07d}-{n}", n + 1
    return name


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path,
              tracking_uri: str | None = None) -> Path:
    """One Hugging Face directory (safetensors, config, tokenizer) from any checkpoint: a
    copy for DDP, a gather of the FSDP shards (single process, no cluster needed) for FSDP,
    the base with the adapter merged in for LoRA (the adapter's files kept in `adapter/`;
    a `models:/` base is fetched from `tracking_uri`'s registry).
    Written to a temp sibling and renamed, so `out_dir` is complete or absent."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: not a training checkpoint (no config.json)")
    if not (src / STATE_FILE).exists():
        raise IncompleteCheckpoint(f"{src} has no {STATE_FILE}: it was never finished")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if is_adapter_checkpoint(src):
            from lmforge.registry import local_model_dir

            base = base_of(src)
            merge(local_model_dir(base, tracking_uri, "model.pretrained"), src, tmp)
            _copy_tokenizer(src, tmp)
        elif (src / DCP_DIR).is_dir():
            config = AutoConfig.from_pretrained(src)
            model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
            sd = {"model": model.state_dict()}
            _safe_dcp_load(sd, src / DCP_DIR)
            model.load_state_dict(sd["model"])
            model.tie_weights()
            model.save_pretrained(tmp)
            _copy_tokenizer(src, tmp)
        else:
            for f in src.iterdir():
                if f.is_file() and f.name.endswith((".json", ".safetensors", ".txt", ".model")) \
                        and f.name not in (STATE_FILE, SET_ASIDE_FILE):
                    shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_tokenizer(src: Path, out: Path) -> None:
    """The checkpoint's tokenizer and generation files (not its weights or trainer files)."""
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(("rng_rank", "trainer_state", "config",
                                                  "SET_ASIDE", "adapter_", "optimizer")):
            shutil.copy2(f, out / f.name)


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
