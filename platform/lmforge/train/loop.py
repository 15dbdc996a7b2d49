"""`train_fn_per_worker`: the loop every Ray Train worker runs.

Reads top to bottom: build, resume, then per step set the LR, take this rank's batch,
forward, backward (DDP all-reduces gradients here), clip, step, and every `eval_every`
steps evaluate, checkpoint and report.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.config import JobSpec, TrainConfig
from lmforge.data import BlockShard, PreparedData, ValidationSet
from lmforge.model import build_model, count_parameters
from lmforge.tracking import RunTracker
from lmforge.train.checkpoint import load_training_state, save_checkpoint


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `final_lr` at the last step (steps - 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.final_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: biases and LayerNorm gains are not decayed.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ValidationSet, device: torch.device) -> float:
    """Mean validation loss per token over every rank's fixed validation batches."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    for x, y in val:
        x, y = x.to(device), y.to(device)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(y.numel(), device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def train_fn_per_worker(config: dict[str, Any]) -> None:
    spec: JobSpec = config["spec"]
    data: PreparedData = config["data"]
    tracker: RunTracker | None = config.get("tracker")
    cfg = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts it)
    model = build_model(spec.model, data.vocab_size, data.eos_id)
    model = ray.train.torch.prepare_model(model)
    raw_model = getattr(model, "module", model)
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(raw_model, cfg)

    # After a worker died, Ray Train restarts the group with the latest checkpoint.
    start, attempt, best_val = 0, 1, math.inf
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            meta = load_training_state(d, raw_model, optimizer)
        start, attempt = meta["step"], meta.get("attempt", 1) + 1
        best_val = meta["metrics"].get("best_val_loss", math.inf)
        print(f"[lmforge] rank {rank}: attempt {attempt} resumes from step {start}", flush=True)

    shard = BlockShard(data.train_path, spec.model.block_size, rank, world, cfg.seed,
                       cfg.micro_batch_size)
    val = ValidationSet(data.val_path, spec.model.block_size, rank, world,
                        cfg.micro_batch_size, cfg.eval_batches)
    log = tracker if rank == 0 else None
    if log is not None and start == 0:
        log.log_params({"model.parameters": count_parameters(raw_model)})
    tokens_per_step = cfg.micro_batch_size * spec.model.block_size * world
    train_time, timed_steps = 0.0, 0
    run_id = tracker.run_id if tracker else ""

    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = shard.batch(step)
        x, y = x.to(device), y.to(device)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()  # DDP all-reduces gradients during backward
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.tensor(0.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss_value = loss.item()  # a device sync point: only on logging steps
        train_time += time.perf_counter() - t0
        timed_steps += 1
        tokens_per_s = tokens_per_step * timed_steps / train_time

        if done % cfg.log_every == 0 and log is not None:
            eta = (cfg.steps - done) * train_time / timed_steps
            print(f"[lmforge] step {done}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e} "
                  f"tokens/s {tokens_per_s:,.0f} eta {eta:.0f}s", flush=True)
            log.log_metrics({"train_loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s,
                             "grad_norm": float(grad_norm)}, step=done)

        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate(model, val, device)
            best_val = min(best_val, val_loss)
            metrics = {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                       "best_val_loss": best_val, "tokens_per_s": tokens_per_s,
                       "tokens": done * tokens_per_step, "mlflow_run_id": run_id,
                       "attempt": attempt, "resumed_from_step": start}
            if log is not None:
                log.log_metrics({k: metrics[k] for k in ("val_loss", "val_ppl")}, step=done)
            _report(metrics, raw_model, optimizer, data, rank)


def _report(metrics: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            data: PreparedData, rank: int) -> None:
    """Every rank reports (it is a barrier); only rank 0 writes the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(tmp, model, data.tokenizer_dir, optimizer, metrics["step"], metrics,
                            metrics["attempt"])
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_{metrics['step']:07d}")
