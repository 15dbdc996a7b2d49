"""Cooldown forks: score a run at a step as if it ended there, then go on as if it had not.

At a search rung (`tune.rung_cooldown`) every worker snapshots its training state in memory
(parameters, buffers, optimizer moments, RNG, gradient scaler), trains a short fork whose
LR decays from the run's current LR to `min_lr` on the next training batches, evaluates
it, and puts the snapshot back, so the run's own curve is the same, bit for bit, as
without the fork. All ranks fork together: the fork's steps are ordinary synchronised
optimizer steps (DDP all-reduce, FSDP collectives) and its evaluation is all-reduced.

Why the next batches: the fork is then exactly the run that a WSD schedule ending at
`rung + cooldown` steps would have trained (Hägele et al. 2024, arXiv 2405.18392: such a
fork reaches the loss of a run of that length), and every trial of a search sees the same
batches at the same rung (the data order is a pure function of seed and sample index), so
the scores compare trials, not data. A fixed slice of earlier batches would instead train
the fork again on what the run has already seen. The validation set stays held out.

No Ray here: `loop.py` calls `cooldown_fork` at its rungs; the unit tests call it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from lmforge.config import TrainConfig
from lmforge.train.parallel import Parallel
from lmforge.train.step import decay_lr, lr_at, train_step

RUNG_METRIC = "rung_val_loss"
"""Reported (and logged to MLflow at the rung's step) at each rung: the fork's val loss."""
SEARCH_METRIC = "search_loss"
"""What a search with cooldown rungs ranks by: the fork's val loss at a rung, the run's
own val loss at every other evaluation (the last one included)."""

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CooldownRungs:
    """Where a run forks a cooldown: at each of `steps` (optimizer steps done), for
    `fraction` of that many steps."""
    steps: tuple[int, ...]
    fraction: float

    def length(self, rung: int) -> int:
        return max(1, round(self.fraction * rung))

    def branch_prefix(self, rung: int) -> str:
        """MLflow metric prefix of the fork at `rung`: `cooldown/250/train_loss`, logged
        at the run's own step numbers, so the UI draws it as a branch off the run's curve."""
        return f"cooldown/{rung}/"


class Snapshot:
    """A copy of everything an optimizer step changes, taken in memory and put back in
    place (the live tensors stay the same objects: DDP's buckets, FSDP's DTensors, a
    compiled graph and the optimizer's references all keep pointing at them)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 par: Parallel) -> None:
        self._model = model
        _reshard(model)
        live = [*model.parameters(), *model.buffers()]
        with torch.no_grad():
            self._tensors = [(t, t.detach().clone()) for t in live]
            self._optimizer = [(state, {k: v.detach().clone() if torch.is_tensor(v) else v
                                        for k, v in state.items()})
                               for state in optimizer.state.values()]
        self._lrs = [(g, g["lr"]) for g in optimizer.param_groups]
        self._scaler, self._scaler_state = par.scaler, par.scaler.state_dict()
        self._cpu_rng = torch.get_rng_state()
        self._device = par.device
        self._cuda_rng = torch.cuda.get_rng_state(par.device) \
            if par.device.type == "cuda" else None

    def restore(self) -> None:
        _reshard(self._model)  # so the next forward gathers the restored shards
        with torch.no_grad():
            for live, saved in self._tensors:
                live.copy_(saved)
            for state, saved in self._optimizer:
                for k, v in saved.items():
                    if torch.is_tensor(v) and torch.is_tensor(state.get(k)):
                        state[k].copy_(v)
                    else:
                        state[k] = v
        for group, lr in self._lrs:
            group["lr"] = lr
        if self._scaler_state:  # empty when the scaler is disabled (not fp16)
            self._scaler.load_state_dict(self._scaler_state)
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state(self._cuda_rng, self._device)


def _reshard(model: torch.nn.Module) -> None:
    """FSDP2: put every module back to its sharded parameters. A forward without a
    backward (an evaluation) leaves the root unsharded, and the next forward would use
    that gathered copy instead of the shards a restore writes."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def cooldown_fork(model: torch.nn.Module, par: Parallel, optimizer: torch.optim.Optimizer,
                  cfg: TrainConfig, rung: int, length: int,
                  batches: Callable[[int], Iterable[Batch]], score: Callable[[], float],
                  on_step: Callable[[int, float, torch.Tensor], Any] | None = None) -> float:
    """Fork the run after `rung` optimizer steps, train `length` steps decaying the LR
    from the run's next one (`lr_at(rung)`) to `final_lr` with `decay_shape`, return
    `score()` of the fork (the validation loss) and restore the run exactly.

    `batches(step)` gives the micro-batches of optimizer step `step` (the fork's step i
    trains on the run's step rung + i); `on_step(step, lr, loss)` sees each fork step
    (`step` counted on the run's axis, rung + i + 1) for logging."""
    saved = Snapshot(model, optimizer, par)
    start_lr = lr_at(rung, cfg)
    try:
        for i in range(length):
            lr = decay_lr(i, length, start_lr, cfg.final_lr, cfg.decay_shape)
            loss, _ = train_step(model, par, optimizer, batches(rung + i), lr)
            if on_step is not None:
                on_step(rung + i + 1, lr, loss)
        return score()
    finally:
        saved.restore()

