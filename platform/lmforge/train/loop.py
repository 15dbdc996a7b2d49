"""`train_fn_per_worker`: the loop every Ray Train worker runs.

Reads top to bottom: build and wrap the model (DDP or FSDP2), resume from the latest
checkpoint if there is one, then per optimizer step: set the LR, run `grad_accum`
micro-steps (gradients synchronised on the last only), clip, step, log; every `eval_every`
steps evaluate, every `checkpoint_every` steps checkpoint, and report to Ray Train.
"""

from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.config import JobSpec, TrainConfig
from lmforge.data import BlockShard, PreparedData, ValidationSet
from lmforge.model import build_model, count_parameters, flops_per_token
from lmforge.tracking import RunTracker
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint
from lmforge.train.parallel import Parallel

# Dense bf16/fp16 peak FLOP/s per GPU, for MFU when the spec does not set train.peak_flops.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A10G": 125e12, "L4": 121e12, "V100": 125e12}
STEADY_AFTER = 2  # steps not timed at the start of an attempt (allocator, compile warm-up)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `final_lr` at the last step (steps - 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.final_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ValidationSet, device: torch.device,
             par: Parallel | None = None) -> float:
    """Mean validation loss per token over every rank's fixed validation batches."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    for x, y in val:
        x, y = x.to(device), y.to(device)
        with par.autocast() if par else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(y.numel(), device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@dataclass
class TrainerState:
    """What a checkpoint carries besides weights, optimizer and RNG."""
    step: int = 0
    attempt: int = 1
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    early_stop_best: float = math.inf

    def record_eval(self, val_loss: float, patience: int | None, min_delta: float) -> bool:
        """Note one validation loss; True when early stopping says stop: `patience`
        evaluations in a row without beating the best by more than `min_delta`."""
        self.best_val_loss = min(self.best_val_loss, val_loss)
        if val_loss < self.early_stop_best - min_delta:
            self.early_stop_best, self.evals_since_best = val_loss, 0
        else:
            self.evals_since_best += 1
        return patience is not None and self.evals_since_best >= patience


def train_fn_per_worker(config: dict[str, Any]) -> None:
    spec: JobSpec = config["spec"]
    data: PreparedData = config["data"]
    tracker: RunTracker | None = config.get("tracker")
    cfg = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    par = Parallel(cfg, device)
    say(f"[lmforge] rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()} "
        f"({device}, {torch.get_num_threads()} threads, {cfg.strategy}, {cfg.precision})")

    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = par.wrap(build_model(spec.model, data.vocab_size, data.eos_id))
    raw = par.unwrap(model)
    optimizer = make_optimizer(model, cfg, device)
    torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own (dropout) stream

    # After a worker died, or with `lmforge train --resume`, Ray Train hands every worker
    # the latest registered checkpoint.
    state, resumed_from = TrainerState(), 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            saved = load_checkpoint(d, model, par, optimizer, rank)
        state = TrainerState(**{k: saved[k] for k in asdict(state)})
        state.attempt += 1
        resumed_from = state.step
        say(f"[lmforge] rank {rank}: attempt {state.attempt} resumes from step {state.step}")

    shard = BlockShard(data.train_path, spec.model.block_size, rank, world, cfg.seed,
                       cfg.micro_batch_size)
    val = ValidationSet(data.val_path, spec.model.block_size, rank, world,
                        cfg.micro_batch_size, cfg.eval_batches)
    log = tracker if rank == 0 else None
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * spec.model.block_size * world
    flops_per_step = flops_per_token(raw, spec.model.block_size) * tokens_per_step
    peak_flops = _peak_flops(cfg, device)
    if log is not None and state.step == 0:
        log.log_params({"model.parameters": count_parameters(raw),
                        "train.global_batch_sequences": tokens_per_step // spec.model.block_size,
                        "train.tokens_per_step": tokens_per_step})
    run_id = tracker.run_id if tracker else ""
    train_time, timed_steps = 0.0, 0

    model.train()
    for step in range(state.step, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = shard.batch(step * cfg.grad_accum + micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with par.micro_step(model, last=micro == cfg.grad_accum - 1):
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / cfg.grad_accum
            par.backward(loss)
            step_loss += loss.detach()
        grad_norm = par.clip_and_step(model, optimizer)
        done = step + 1
        logging = done % cfg.log_every == 0
        if logging:
            loss_value = step_loss.item()  # a device sync point: only on logging steps
        if done - state.step > STEADY_AFTER:
            train_time += time.perf_counter() - t0
            timed_steps += 1
        tokens_per_s = tokens_per_step * timed_steps / train_time if train_time else 0.0

        if logging and log is not None:
            step_s = train_time / max(1, timed_steps)
            throughput = {"train_loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": tokens_per_s, "step_time_ms": 1000 * step_s,
                          "peak_memory_mb": _peak_memory_mb(device)}
            if peak_flops and train_time:
                throughput["mfu"] = flops_per_step / step_s / (peak_flops * world)
            say(f"[lmforge] step {done}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e} "
                f"tokens/s {tokens_per_s:,.0f} step {1000 * step_s:.0f}ms"
                + (f" mfu {throughput['mfu']:.1%}" if "mfu" in throughput else "")
                + f" eta {_eta((cfg.steps - done) * step_s)}")
            log.log_metrics(throughput, step=done)

        checkpointing = done % cfg.checkpoint_interval == 0 or done == cfg.steps
        if not (checkpointing or done % cfg.eval_every == 0):
            continue
        val_loss = evaluate(model, val, device, par)  # all-reduced: every rank agrees
        state.step = done
        stop = state.record_eval(val_loss, cfg.early_stopping_patience,
                                 cfg.early_stopping_min_delta)
        metrics = {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                   "best_val_loss": state.best_val_loss, "tokens_per_s": tokens_per_s,
                   "tokens": done * tokens_per_step, "mlflow_run_id": run_id,
                   "attempt": state.attempt, "resumed_from_step": resumed_from,
                   "stopped_early": stop}
        if log is not None:
            log.log_metrics({k: metrics[k] for k in ("val_loss", "val_ppl")}, step=done)
            if stop:
                say(f"[lmforge] early stop at step {done}: no better validation loss in "
                    f"{state.evals_since_best} evaluations")
        _report(metrics, model, par, optimizer, data, rank, state,
                checkpoint=checkpointing or stop)
        if stop:
            break


def _report(metrics: dict[str, Any], model: torch.nn.Module, par: Parallel,
            optimizer: torch.optim.Optimizer, data: PreparedData, rank: int,
            state: TrainerState, checkpoint: bool) -> None:
    """Every rank reports (it is a barrier); with a checkpoint, every rank writes its part
    and Ray Train merges them into one directory before registering it."""
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, par, optimizer, rank, data.tokenizer_dir,
                        asdict(state) | {"metrics": metrics})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{metrics['step']:07d}")


def say(message: str) -> None:
    """One progress line on the driver's console. To the process's real stdout: Ray Train
    also copies `print` to its logger whenever a library has wrapped sys.stdout, which
    showed every line twice."""
    print(message, file=sys.__stdout__, flush=True)


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_flops or device.type != "cuda":
        return cfg.peak_flops
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    # fp32 matmuls run as TF32 on these GPUs: half the bf16 rate.
    return peak / 2 if peak and cfg.precision == "fp32" else peak


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
