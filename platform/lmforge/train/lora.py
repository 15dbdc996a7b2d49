"""LoRA adapters (`train.method: lora`) through `peft`: wrap the base model, and the
adapter's own files (what a checkpoint holds instead of the whole model), and the merge
that turns base + adapter into one ordinary Hugging Face model for the registry.

An adapter checkpoint directory holds, besides the trainer's own files:

    adapter_model.safetensors   the adapter's weights, in peft's layout (no adapter name)
    adapter_config.json         peft's LoraConfig; `base_model_name_or_path` is the spec's
                                `model.pretrained` (a `models:/NAME/VERSION` URI, a local
                                directory or a hub id): where the base comes back from
    config.json                 the base's config (small), so it reads as a checkpoint

Gathering goes through the trainable parameters (FSDP: each all-gathered)
and `torch.distributed.checkpoint.state_dict` for the optimizer and for loading, so DDP,
FSDP2 and a single process save and load alike, and only the adapter's parameters (a few
percent of the model) are ever gathered or written.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils.save_and_load import (
    _insert_adapter_name_into_state_dict,
    get_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from lmforge.config import TrainConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"
"""The adapter's files inside a merged export (a subdirectory: transformers would try to
load an `adapter_config.json` at the top of a model directory as the model itself)."""
ADAPTER_NAME = "default"  # peft's name for the one adapter a model gets

DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
"""Every attention and MLP projection: adapting only attention (the LoRA paper's q/v)
gives up quality that the MLP adapters buy cheaply (QLoRA paper, section 4)."""

# Only the adapters: the frozen base is neither gathered nor written.
_ADAPTER_ONLY = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                 ignore_frozen_params=True)


def is_lora(cfg: TrainConfig) -> bool:
    return cfg.method in ("lora", "qlora")


def check_supported(cfg: TrainConfig) -> None:
    """Refuse, before any worker starts, a method this machine or cluster cannot run."""
    if cfg.method != "qlora":
        return
    if cfg.strategy == "fsdp":
        raise ValueError("train.method: 'qlora' with train.strategy: 'fsdp': FSDP2 cannot "
                         "shard bitsandbytes' packed 4-bit weights; use train.strategy: ddp")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("train.method: 'qlora' quantises the base with bitsandbytes, which is "
                         "not installed (pip install bitsandbytes, on a CUDA machine); "
                         "train.method: lora trains the same adapters on an fp32/bf16 base")
    # Refused rather than run as plain LoRA: the 4-bit load (bitsandbytes, device_map onto
    # the worker's GPU, peft's prepare_model_for_kbit_training) is not wired into the
    # worker's model build yet, and has never run on this project's machines.
    raise ValueError("train.method: 'qlora' is not available in this version of lmforge "
                     "(the 4-bit base load is not implemented); use train.method: lora "
                     "with train.precision: bf16")


def target_modules(model: PreTrainedModel, cfg: TrainConfig) -> list[str]:
    if cfg.lora.target_modules:
        return list(cfg.lora.target_modules)
    arch = model.config.model_type
    if arch not in DEFAULT_TARGETS:
        raise ValueError(f"train.lora.target_modules: no default for a {arch!r} model; name "
                         "its linear layers (for example q_proj, v_proj)")
    return DEFAULT_TARGETS[arch]


def apply_lora(model: PreTrainedModel, cfg: TrainConfig, base: str | None) -> PeftModel:
    """`model` with adapters on `train.lora`'s target modules; every base weight frozen.
    `base` (the spec's `model.pretrained`) is recorded in the adapter's config."""
    targets = target_modules(model, cfg)
    config = PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=targets, task_type="CAUSAL_LM",
        # GPT-2's projections are Conv1D, whose weight is stored (in, out).
        fan_in_fan_out=model.config.model_type == "gpt2")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"train.lora.target_modules {targets}: {e}") from None
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = base
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 peft_model: PeftModel, rank: int, optimizer_file: str) -> None:
    """Write the adapter and its optimizer state (rank 0). A collective: every rank calls it
    (FSDP gathers each adapter parameter's shards; DDP and one process gather nothing)."""
    weights = _adapter_weights(model)
    optim = get_optimizer_state_dict(model, optimizer, options=_ADAPTER_ONLY)
    if rank != 0:
        return
    adapter = get_peft_model_state_dict(peft_model, state_dict=weights,
                                        adapter_name=ADAPTER_NAME)
    save_file({k: v.contiguous() for k, v in adapter.items()}, directory / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    peft_model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
    peft_model.get_base_model().config.save_pretrained(directory)
    torch.save({"optimizer": optim}, directory / optimizer_file)


def load_adapter(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, optimizer_file: str) -> None:
    """Restore the adapter and its optimizer state into `model` (wrapped or not). Every
    rank reads the files (each has the merged checkpoint); FSDP keeps its shard of each.
    Raises when the adapter does not fit the model (other rank or targets): a resume then
    falls back to an older checkpoint, or stops naming them all."""
    weights = _insert_adapter_name_into_state_dict(
        load_file(directory / ADAPTER_WEIGHTS), ADAPTER_NAME, "lora_")
    expected = set(_trainable_names(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} does not fit this model's adapters "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was "
                         "train.lora changed since the run started?")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    optim = torch.load(directory / optimizer_file, weights_only=True, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, optim["optimizer"], options=options)


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """The trainable parameters' names as torch's state-dict API spells them (no DDP
    `module.` prefix), in the module's order: the same on every rank."""
    return [name.removeprefix("module.") for name, p in model.named_parameters()
            if p.requires_grad]


def _adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on the CPU. Under FSDP a collective (each one's
    shards all-gathered, in the same order on every rank); the frozen base is never
    gathered (torch's `ignore_frozen_params` still gathers a tied output head)."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in zip(_trainable_names(model), params, strict=True)}


def is_adapter_checkpoint(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).exists()


def base_of(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, as its run's spec named it."""
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} names no base model "
                         "(base_model_name_or_path): nothing to merge the adapter into")
    return str(base)


def merge(base_dir: str | Path, adapter_dir: Path, out: Path) -> None:
    """Base + adapter as one Hugging Face model in `out` (safetensors), the adapter's files
    beside it in `out/adapter/`: what `lmforge serve` and the registry take unchanged."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True,
                                                torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    (out / ADAPTER_DIR).mkdir(exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copy2(adapter_dir / name, out / ADAPTER_DIR / name)


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts for the run's params: all, and trainable."""
    total = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model)
    return {"model.trainable_parameters": trainable,
            "model.trainable_fraction": round(trainable / total, 6)}
