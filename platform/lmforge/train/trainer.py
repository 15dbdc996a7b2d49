"""Build and run the Ray Train `TorchTrainer` for a spec."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from lmforge.config import JobSpec
from lmforge.data import PreparedData
from lmforge.storage import require_shared
from lmforge.tracking import RunTracker
from lmforge.train.loop import train_fn_per_worker


@dataclass(frozen=True)
class TrainOutcome:
    steps: int
    val_loss: float
    best_val_loss: float
    tokens_per_s: float
    checkpoint: str
    """Directory of the checkpoint with the lowest validation loss (Hugging Face format)."""
    attempts: int
    """Worker-group attempts that reported: 1 + restarts resumed from a checkpoint."""
    resumed_from_step: int
    """Step the final attempt started from (0 when it never restarted)."""


def build_trainer(spec: JobSpec, data: PreparedData, tracker: RunTracker | None, name: str,
                  callbacks: Sequence[UserCallback] = ()) -> TorchTrainer:
    cfg = spec.train
    require_shared(cfg.storage_path, "train.storage_path")  # multi-host needs shared storage
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec, "data": data, "tracker": tracker},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(cfg.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
        ),
    )


def run_training(spec: JobSpec, data: PreparedData, tracker: RunTracker | None, name: str,
                 callbacks: Sequence[UserCallback] = ()) -> TrainOutcome:
    result = build_trainer(spec, data, tracker, name, callbacks).fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {name!r} reported no checkpoint")
    m = result.metrics
    return TrainOutcome(steps=m["step"], val_loss=m["val_loss"], best_val_loss=m["best_val_loss"],
                        tokens_per_s=m["tokens_per_s"], checkpoint=best.path,
                        attempts=m["attempt"], resumed_from_step=m["resumed_from_step"])
