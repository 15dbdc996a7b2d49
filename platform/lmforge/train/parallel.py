"""How a model is spread over the workers (DDP or FSDP2) and at what precision.

`Parallel` is the one place that knows the strategy: it wraps the model, says when
gradients synchronise, and builds the autocast context and gradient scaler. The loop and
the checkpoint code ask it instead of branching on `train.strategy` themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import TrainConfig
from lmforge.model import transformer_blocks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Parallel:
    cfg: TrainConfig
    device: torch.device
    distributed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1
        self.dtype = DTYPES[self.cfg.precision]
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.cfg.precision == "fp16")
        if self.device.type == "cuda":
            # fp32 matmuls (fp32 runs, the fp32 loss head) as TF32 on the tensor cores,
            # as `step.peak_flops` assumes.
            torch.set_float32_matmul_precision("high")

    @property
    def fsdp(self) -> bool:
        return self.cfg.strategy == "fsdp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and shard or replicate. Returns the module to call; the
        unwrapped one (for saving and the optimizer) is `unwrap(result)`."""
        if self.cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device)
        if self.fsdp:
            # FSDP2: one all-gather unit per block, then the root (embeddings, final norm,
            # tied head). Parameters stay fp32 (the optimizer's master copy); the mixed
            # precision policy casts them for compute and reduces gradients in fp32.
            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
            for block in transformer_blocks(model):
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        elif self.distributed:
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model.compile()  # in place: state-dict keys and the wrappers stay as they are
        return model

    @staticmethod
    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    @contextlib.contextmanager
    def micro_step(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch: gradients are synchronised across
        workers only on the last micro-step of an optimizer step, and the forward pass
        runs under autocast when a lower precision is asked for (DDP; FSDP casts itself)."""
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        elif isinstance(model, DistributedDataParallel) and not last:
            sync = model.no_sync()
        else:
            sync = contextlib.nullcontext()
        with sync, self.autocast():
            yield

    def autocast(self) -> torch.autocast:
        """Lower-precision compute for DDP; FSDP's mixed precision policy does it instead."""
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32 and not self.fsdp)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # DDP/FSDP reduce gradients in here (last micro-step)

    def clip_and_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                      ) -> torch.Tensor:
        """Unscale (fp16), clip the global gradient norm, step, zero. Returns the norm
        before clipping (0 when clipping is off), as a tensor: reading it syncs."""
        self.scaler.unscale_(optimizer)
        norm = torch.zeros(())
        if self.cfg.grad_clip > 0:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            # FSDP: a DTensor already reduced over the mesh; .full_tensor() is local.
            norm = total.full_tensor() if hasattr(total, "full_tensor") else total
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm
