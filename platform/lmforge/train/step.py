"""One optimizer step and what it needs: the LR schedule, AdamW, evaluation, throughput.

No Ray here: the worker loop (`loop.py`) drives these under Ray Train, and
`bench/train_gpu.py` drives the very same code on a GPU machine without Ray.
"""

from __future__ import annotations

import functools
import math
import resource
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.config import TrainConfig
from lmforge.train.parallel import Parallel

if TYPE_CHECKING:
    from lmforge.data import ValidationSet

# Dense bf16/fp16 peak FLOP/s per GPU, for MFU when the spec does not set train.peak_flops.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A10G": 125e12, "L4": 121e12, "V100": 125e12}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then either cosine decay to `final_lr` at the last step
    (steps - 1), or (`wsd`) `lr` held until the last `decay_steps`, which decay to
    `final_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        start = cfg.steps - cfg.decay_steps
        if step < start:
            return cfg.lr
        return decay_lr(step - start, cfg.decay_steps, cfg.lr, cfg.final_lr, cfg.decay_shape)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.final_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


def decay_lr(i: int, n: int, start_lr: float, final_lr: float, shape: str) -> float:
    """Step `i` of an `n`-step decay from `start_lr` to `final_lr` (reached at i = n - 1):
    WSD's decay phase and a rung's cooldown fork. The first step is already below
    `start_lr`, the step before the decay ran at it."""
    progress = (i + 1) / n
    left = 1 - progress if shape == "linear" else 1 - math.sqrt(progress)  # 1-sqrt
    return final_lr + left * (start_lr - final_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   device: torch.device | None = None) -> torch.optim.AdamW:
    # Weight decay on matrices only: biases and norm gains are not decayed.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = cfg.fused_optimizer and (device or torch.device("cpu")).type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch, computed in fp32. With `position_ids`
    (rows of instruction/chat examples, `data.chat`): the mean over the labelled tokens
    (labels -100 are off the loss), and the position restarts keep packed examples apart."""
    if position_ids is None:  # a token stream: today's path, untouched
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    # No KV cache: with one, transformers does not read position restarts as packed
    # sequences, and examples would attend to each other.
    logits = model(input_ids=x, position_ids=position_ids, use_cache=False).logits
    total = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                            reduction="sum")
    # A micro-batch whose labels are all -100 (possible only with tiny blocks) adds 0, not NaN.
    return total / (y != -100).sum().clamp(min=1)


@functools.cache
def _compiled_lm_loss() -> Callable[..., torch.Tensor]:
    # Forward and loss in one graph: the fp32 upcast and the softmax fuse into the loss
    # kernel instead of writing (batch x block x vocab) fp32 logits to memory and back.
    return torch.compile(lm_loss)


def train_step(model: torch.nn.Module, par: Parallel, optimizer: torch.optim.Optimizer,
               micro_batches: Iterable[tuple[torch.Tensor, ...]], lr: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches: gradients synchronise on the
    last only, then clip and step. Returns (mean loss, gradient norm) as device tensors,
    so the caller decides when to pay for a sync by reading them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum = par.cfg.grad_accum
    # FSDP2's per-block hooks break a graph around the whole model into pieces: there the
    # compiled model (`Parallel.wrap`) with an eager loss is faster (measured on an H200).
    loss_fn = _compiled_lm_loss() if par.cfg.compile and not par.fsdp else lm_loss
    step_loss = torch.zeros((), device=par.device)
    for micro, batch in enumerate(micro_batches):
        # (inputs, targets), or (inputs, labels, position ids) for rows of examples
        tensors = [t.to(par.device, non_blocking=True) for t in batch]
        with par.micro_step(model, last=micro == accum - 1):
            loss = loss_fn(model, *tensors) / accum
        par.backward(loss)
        step_loss += loss.detach()
    return step_loss, par.clip_and_step(model, optimizer)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ValidationSet, device: torch.device,
             par: Parallel | None = None) -> float:
    """Mean validation loss per token over every rank's fixed validation batches; for rows
    of instruction/chat examples, per assistant token (the labelled ones)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    for batch in val:
        x, y, *rest = (t.to(device) for t in batch)
        extra = {"position_ids": rest[0], "use_cache": False} if rest else {}  # see lm_loss
        with par.autocast() if par else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=x, **extra).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                               reduction="sum")
        counted = (y != -100).sum() if rest else torch.tensor(y.numel(), device=device)
        total += torch.stack([loss.double(), counted.double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """Peak FLOP/s of one device for MFU: the spec's, else looked up for a known GPU."""
    if cfg.peak_flops or device.type != "cuda":
        return cfg.peak_flops
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    # fp32 matmuls run as TF32 on these GPUs: half the bf16 rate.
    return peak / 2 if peak and cfg.precision == "fp32" else peak


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
