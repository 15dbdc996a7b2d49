"""`train_fn_per_worker`: the loop every Ray Train worker runs.

Reads top to bottom: build and wrap the model (DDP or FSDP2), resume from the latest
checkpoint if there is one, then per optimizer step: set the LR, run `grad_accum`
micro-steps (gradients synchronised on the last only), clip, step, log; every `eval_every`
steps evaluate, every `checkpoint_every` steps checkpoint, and report to Ray Train. Rank 0's
metrics go to MLflow through a `TrackingBuffer` (queued, sent in the background: an MLflow
outage never stalls the loop); a SIGTERM to the driver stops every rank after the same step
with a checkpoint there (`lmforge.train.preempt`). In a search with `tune.rung_cooldown`,
each rung also forks a cooldown, scores it and restores the run (`lmforge.train.fork`).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from lmforge.config import JobSpec, TrainConfig
from lmforge.data import BlockShard, PreparedData, ValidationSet
from lmforge.model import build_model, count_parameters, flops_per_token
from lmforge.tracking import RunTracker, TrackingBuffer
from lmforge.train.checkpoint import (
    checkpoint_dir_name,
    load_checkpoint,
    resume_from,
    save_checkpoint,
)
from lmforge.train.fork import RUNG_METRIC, SEARCH_METRIC, CooldownRungs, cooldown_fork
from lmforge.train.lora import apply_lora, describe, is_lora
from lmforge.train.parallel import Parallel
from lmforge.train.preempt import StopCheck, watch
from lmforge.train.samples import ARTIFACT, sample_prompts, sample_rows
from lmforge.train.step import (
    evaluate,
    lr_at,
    make_optimizer,
    peak_flops,
    peak_memory_mb,
    train_step,
)

STEADY_AFTER = 2  # steps not timed at the start of an attempt (allocator, compile warm-up)
UNSCORED = 1e30
DRAIN_S = 2.0  # at most this long, and only while MLflow answers, before an evaluation's report
"""The `val_loss` a preemption checkpoint is registered with (it is not evaluated): never
the best, and the first of the kept ones to go once a later one supersedes it. Finite,
because Ray Train's checkpoint snapshot stores inf as null and then cannot rank it."""


@dataclass
class TrainerState:
    """What a checkpoint carries besides weights, optimizer and RNG."""
    step: int = 0
    attempt: int = 1
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    early_stop_best: float = math.inf
    cooldown_steps: int = 0
    """Optimizer steps trained in cooldown forks (`tune.rung_cooldown`): they count in
    `tokens`, which budgets sum."""

    def record_eval(self, val_loss: float, patience: int | None, min_delta: float) -> bool:
        """Note one validation loss; True when early stopping says stop: `patience`
        evaluations in a row without beating the best by more than `min_delta`."""
        self.best_val_loss = min(self.best_val_loss, val_loss)
        if val_loss < self.early_stop_best - min_delta:
            self.early_stop_best, self.evals_since_best = val_loss, 0
        else:
            self.evals_since_best += 1
        return patience is not None and self.evals_since_best >= patience


@dataclass(frozen=True)
class StepInfo:
    """Where a worker is, for a step hook."""
    step: int
    """Optimizer steps done."""
    rank: int
    attempt: int
    run_name: str
    spec: JobSpec


StepHook = Callable[[StepInfo], None]


def train_fn_per_worker(config: dict[str, Any]) -> None:
    spec: JobSpec = config["spec"]
    data: PreparedData = config["data"]
    tracker: RunTracker | None = config.get("tracker")
    step_hook: StepHook | None = config.get("step_hook")
    rungs: CooldownRungs | None = config.get("cooldown")
    pause_at: tuple[int, ...] = config.get("pause_at", ())
    cfg = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()
    par = Parallel(cfg, device)
    say(f"[lmforge] rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()} "
        f"({device}, {torch.get_num_threads()} threads, {cfg.strategy}, {cfg.precision})")

    torch.manual_seed(cfg.seed)  # identical init on every rank (adapters included)
    base = build_model(spec.model, data.vocab_size, data.eos_id,
                       tracker.uri if tracker is not None else None)
    if is_lora(cfg):  # the base frozen; only the adapters train, sit in the optimizer, save
        base = apply_lora(base, cfg, spec.model.pretrained)
    model = par.wrap(base)
    raw = par.unwrap(model)
    optimizer = make_optimizer(model, cfg, device)
    torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own (dropout) stream

    # After a worker died, or with `lmforge train --resume`, Ray Train hands every worker
    # the latest registered checkpoint; if it does not load, an older kept one is used.
    state, resumed_from, set_aside = TrainerState(), 0, []
    if (ckpt := ray.train.get_checkpoint()) is not None:
        resumed = resume_from(ckpt, _kept_checkpoints,
                              lambda c: _load(c, model, par, optimizer, rank), _agree, rank,
                              warn=lambda message: say(f"[lmforge] warning: {message}"))
        # A checkpoint from before a field existed keeps that field's default.
        state = TrainerState(**{k: resumed.state[k] for k in asdict(state)
                                if k in resumed.state})
        state.attempt += 1
        resumed_from, set_aside = state.step, resumed.set_aside
        say(f"[lmforge] rank {rank}: attempt {state.attempt} resumes from step {state.step}")

    # Micro-batch index step * grad_accum + m: the same global batches for any world size.
    shard = BlockShard(data, spec.model.block_size, rank, world, cfg.seed,
                       cfg.micro_batch_size)
    val = ValidationSet(data, spec.model.block_size, rank, world,
                        cfg.micro_batch_size, cfg.eval_batches)
    log = TrackingBuffer.for_run(tracker, spec.tracking.buffer_size) \
        if rank == 0 and tracker is not None else None
    stop_check = StopCheck(watch(config["stop_flag"])) if config.get("stop_flag") else None
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * spec.model.block_size * world
    flops_per_step = flops_per_token(raw, spec.model.block_size) * tokens_per_step
    peak = peak_flops(cfg, device)
    if log is not None and state.step == 0:
        log.log_params({"model.parameters": count_parameters(raw), **describe(raw),
                        "train.global_batch_sequences": tokens_per_step // spec.model.block_size,
                        "train.tokens_per_step": tokens_per_step})
    run_id = tracker.run_id if tracker else ""
    # Samples at each evaluation: decoded by rank 0, or by every rank under FSDP, where each
    # holds a shard of the weights and every forward pass is a collective.
    sampling = log is not None or (par.fsdp and tracker is not None)
    tokenizer = data.tokenizer() if sampling else None
    prompts = sample_prompts(data, cfg, spec.model.block_size, tokenizer) if sampling else []
    train_time, timed_steps, preempted = 0.0, 0, False

    model.train()
    for step in range(state.step, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        micro_batches = (shard.batch(step * cfg.grad_accum + m) for m in range(cfg.grad_accum))
        step_loss, grad_norm = train_step(model, par, optimizer, micro_batches, lr)
        done = step + 1
        if step_hook is not None:
            step_hook(StepInfo(done, rank, state.attempt, ctx.get_experiment_name(), spec))
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
                          "peak_memory_mb": peak_memory_mb(device)}
            if peak and train_time:
                throughput["mfu"] = flops_per_step / step_s / (peak * world)
            say(f"[lmforge] step {done}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e} "
                f"tokens/s {tokens_per_s:,.0f} step {1000 * step_s:.0f}ms"
                + (f" mfu {throughput['mfu']:.1%}" if "mfu" in throughput else "")
                + f" eta {_eta((cfg.steps - done) * step_s)}")
            log.log_metrics(throughput, step=done)

        # The same answer on every rank (so they all report alike); the last step needs none.
        preempted = stop_check is not None and stop_check.should_stop() and done < cfg.steps
        # A synchronous search's rung: checkpoint, report and end the run (`Paused`).
        pausing = done in pause_at and done < cfg.steps
        checkpointing = done % cfg.checkpoint_interval == 0 or done == cfg.steps or pausing
        rung = rungs is not None and done in rungs.steps and done < cfg.steps
        evaluating = checkpointing or done % cfg.eval_every == 0 or rung
        if preempted and not evaluating:
            # Checkpoint now, without evaluating: the grace period is short.
            state.step = done
            _report({"step": done, "val_loss": UNSCORED, "best_val_loss": state.best_val_loss,
                     "tokens_per_s": tokens_per_s, "attempt": state.attempt,
                     "resumed_from_step": resumed_from, "preempted": True},
                    model, par, optimizer, data, rank, state, checkpoint=True, taken=set_aside)
            break
        if not evaluating:
            continue
        val_loss = evaluate(model, val, device, par)  # all-reduced: every rank agrees
        rows = sample_rows(model if par.fsdp else raw, prompts, done, cfg, tokenizer,
                           data.eos_id, spec.model.block_size, device, par.autocast,
                           fsdp=par.fsdp) if prompts else None
        state.step = done
        rung_loss = None
        if rung:  # every rank reaches the same rungs, so all fork together
            length = rungs.length(done)
            rung_loss = _fork(model, par, optimizer, shard, val, cfg, rungs, done, log)
            state.cooldown_steps += length
            say(f"[lmforge] rung {done}: {RUNG_METRIC} {rung_loss:.4f} after a {length}-step "
                f"cooldown fork (the run's own val_loss {val_loss:.4f}); the run goes on")
        stop = state.record_eval(val_loss, cfg.early_stopping_patience,
                                 cfg.early_stopping_min_delta)
        metrics = {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                   "best_val_loss": state.best_val_loss, "tokens_per_s": tokens_per_s,
                   "tokens": (done + state.cooldown_steps) * tokens_per_step,
                   "cooldown_steps": state.cooldown_steps, "mlflow_run_id": run_id,
                   "attempt": state.attempt, "resumed_from_step": resumed_from,
                   "stopped_early": stop, "preempted": preempted, "pausing": pausing}
        if rungs is not None:
            metrics[SEARCH_METRIC] = val_loss if rung_loss is None else rung_loss
        if rung_loss is not None:
            metrics[RUNG_METRIC] = rung_loss
        finishing = (stop or done == cfg.steps) and not preempted
        if log is not None:
            log.log_metrics({k: metrics[k] for k in ("val_loss", "val_ppl", RUNG_METRIC)
                             if k in metrics}, step=done)
            if rows:  # after the metrics: the slowest upload, best effort (see drain)
                log.log_table(rows, ARTIFACT)
            if stop:
                say(f"[lmforge] early stop at step {done}: no better validation loss in "
                    f"{state.evals_since_best} evaluations")
            if finishing or pausing:  # before the last report, which takes the count
                metrics["tracking_dropped"] = log.close(spec.tracking.flush_timeout_s).dropped
            else:  # ASHA may stop the trial at this report, killing the sender thread
                log.drain(DRAIN_S)
        _report(metrics, model, par, optimizer, data, rank, state,
                checkpoint=checkpointing or stop or preempted, taken=set_aside)
        if stop or preempted or pausing:
            break
    if stop_check is not None:
        stop_check.close()
        if preempted and log is not None:  # the checkpoint first: the grace period is short
            log.close(min(5.0, spec.tracking.flush_timeout_s))


def _fork(model: torch.nn.Module, par: Parallel, optimizer: torch.optim.Optimizer,
          shard: BlockShard, val: ValidationSet, cfg: TrainConfig, rungs: CooldownRungs, rung: int,
          log: TrackingBuffer | None) -> float:
    """The cooldown fork at `rung` (on the next training batches), its val loss, the run
    restored. Rank 0 logs the branch: `cooldown/<rung>/train_loss` and `/lr` at the run's
    own step numbers, and `/val_loss` at its last step."""
    prefix, length = rungs.branch_prefix(rung), rungs.length(rung)

    def batches(step: int) -> Any:
        return (shard.batch(step * cfg.grad_accum + m) for m in range(cfg.grad_accum))

    def on_step(step: int, lr: float, loss: torch.Tensor) -> None:
        if log is not None:  # .item() syncs, on rank 0 only: a fork is a few dozen steps
            log.log_metrics({f"{prefix}train_loss": loss.item(), f"{prefix}lr": lr}, step=step)

    loss = cooldown_fork(model, par, optimizer, cfg, rung, length, batches,
                         lambda: evaluate(model, val, par.device, par), on_step)
    if log is not None:
        log.log_metrics({f"{prefix}val_loss": loss}, step=rung + length)
    return loss


def _report(metrics: dict[str, Any], model: torch.nn.Module, par: Parallel,
            optimizer: torch.optim.Optimizer, data: PreparedData, rank: int,
            state: TrainerState, checkpoint: bool, taken: list[str]) -> None:
    """Every rank reports (it is a barrier); with a checkpoint, every rank writes its part
    and Ray Train merges them into one directory before registering it."""
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, par, optimizer, rank, data.tokenizer_dir,
                        asdict(state) | {"metrics": metrics})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_dir_name(metrics["step"], taken))


def _load(ckpt: ray.train.Checkpoint, model: torch.nn.Module, par: Parallel,
          optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    with ckpt.as_directory() as d:
        return load_checkpoint(d, model, par, optimizer, rank)


def _kept_checkpoints() -> list[ray.train.Checkpoint]:
    """The run's registered checkpoints, newest first (Ray keeps the best
    `train.keep_checkpoints` by validation loss, and the latest)."""
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    return [r.checkpoint for r in sorted(reported, key=lambda r: -r.metrics.get("step", 0))]


def _agree(error: str | None) -> list[str | None]:
    """Every rank's outcome of loading one checkpoint (a collective: all ranks call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [error]
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def say(message: str) -> None:
    """One progress line on the driver's console. To the process's real stdout: Ray Train
    also copies `print` to its logger whenever a library has wrapped sys.stdout, which
    showed every line twice."""
    print(message, file=sys.__stdout__, flush=True)


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
