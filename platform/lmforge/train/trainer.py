"""Build and run the Ray Train `TorchTrainer` for a spec."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback

from lmforge.config import JobSpec
from lmforge.data import PreparedData
from lmforge.runs import require_shared_storage
from lmforge.storage import resolve
from lmforge.tracking import RunTracker
from lmforge.train.checkpoint import DCP_DIR, export_hf, set_aside_reason
from lmforge.train.fork import CooldownRungs
from lmforge.train.loop import StepHook, say, train_fn_per_worker
from lmforge.train.lora import check_supported, is_adapter_checkpoint
from lmforge.train.preempt import Preempted, Preemption


@dataclass(frozen=True)
class TrainOutcome:
    steps: int
    val_loss: float
    best_val_loss: float
    tokens_per_s: float
    checkpoint: str
    """Directory of the checkpoint with the lowest validation loss, in Hugging Face format
    (for FSDP, the export of its shards)."""
    attempts: int
    """Worker-group attempts that reported: 1 + restarts resumed from a checkpoint."""
    resumed_from_step: int
    """Step the final attempt started from (0 when it never restarted)."""
    stopped_early: bool = False
    tracking_dropped: int = 0
    """Metric values rank 0 could not get to MLflow (outage past `tracking.buffer_size`, or
    unsent at `tracking.flush_timeout_s`)."""


KILL_AFTER_S = 10.0


class Deadline(ControllerCallback):
    """Aborts a Train run at a wall-clock time (`time.time()`), wherever it is: waiting
    for its workers, training, or hung in a collective.

    Runs in the Train controller's process: a timer there asks the controller to abort
    itself (`TrainController.abort`, what Ctrl-C on `fit()` does), which stops the worker
    group, frees its placement group and ends `fit()` with an error. A ControllerCallback
    (Ray's DeveloperAPI; RunConfig passes callbacks other than UserCallback through to the
    controller) because nothing outside the controller holds a handle to it."""

    def __init__(self, at: float, reason: str) -> None:
        self.at, self.reason = at, reason

    def after_controller_start(self, train_run_context: Any) -> None:
        import ray

        controller = ray.get_runtime_context().current_actor

        def abort() -> None:
            say(f"[lmforge] {self.reason}: aborting the training run")
            controller.abort.remote()
            # A graceful abort waits on the workers, which a hang can block: past a grace,
            # end the controller's process. Ray then ends the workers and the placement
            # group it owns, as it does when a controller dies.
            time.sleep(KILL_AFTER_S)
            say(f"[lmforge] {self.reason}: the abort did not end it; exiting the controller")
            os._exit(1)

        threading.Thread(target=lambda: (time.sleep(max(0.0, self.at - time.time())),
                                         abort()), daemon=True).start()


class Paused(Exception):  # noqa: N818 (a state, as `Preempted` is, not an error)
    """The run reached a step of `pause_at`, checkpointed and ended there. `metrics`: its
    last report, with the checkpoint's `checkpoint_path`."""

    def __init__(self, metrics: dict[str, Any]) -> None:
        super().__init__(f"paused after step {metrics['step']}")
        self.metrics = metrics


def build_trainer(spec: JobSpec, data: PreparedData, tracker: RunTracker | None, name: str,
                  callbacks: Sequence[UserCallback | ControllerCallback] = (),
                  step_hook: StepHook | None = None, stop_flag: Any = None,
                  cooldown: CooldownRungs | None = None,
                  pause_at: tuple[int, ...] = ()) -> TorchTrainer:
    """`stop_flag`: a `StopFlag` handle whose request makes every worker checkpoint at the
    next step boundary and stop (`lmforge.train.preempt`). `pause_at`: steps where the
    run evaluates, checkpoints and ends (`Paused`)."""
    cfg = spec.train
    require_shared_storage(spec, search=False)  # a multi-host run needs shared paths
    check_supported(cfg)  # a method this cluster cannot run fails here, not in every worker
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec, "data": data, "tracker": tracker,
                           "step_hook": step_hook, "cooldown": cooldown,
                           "pause_at": pause_at, "stop_flag": stop_flag},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            **resolve(cfg.storage_path, "train.storage_path").ray_storage(),
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
                 callbacks: Sequence[UserCallback | ControllerCallback] = (),
                 step_hook: StepHook | None = None, preemptible: bool = False,
                 stop_flag: Any = None,
                 cooldown: CooldownRungs | None = None,
                 pause_at: tuple[int, ...] = ()) -> TrainOutcome:
    """Train run `name` to `train.steps` (or an early stop). Ray Train continues the run
    from the latest checkpoint it finds in storage under `name`: whether that is wanted
    (`--resume`) or refused is the caller's rule (`lmforge.runs.NamedRun`).

    `step_hook(StepInfo)` runs on every worker after each optimizer step: how the chaos
    tests inject faults (a worker killed, a checkpoint damaged, a hang) at a known step.

    `preemptible`: a SIGTERM to this process while it trains (in the main thread) makes
    the workers checkpoint at the next step boundary and stop, and this raise
    `Preempted` (`lmforge.train.preempt`). `stop_flag`: the same stop asked by someone
    else (a search's driver, through its `StopFlag`), for a run that is not in the main
    thread (a trial); it raises `Preempted` too.

    `cooldown`: the steps at which every worker scores a cooldown fork (a search's rungs
    with `tune.rung_cooldown`; `lmforge.train.fork`). `pause_at`: steps where the run
    evaluates, checkpoints and ends, raising `Paused` (a synchronous search's rungs: the
    trial waits there, and a later run with the same name resumes from that checkpoint)."""
    preemption = Preemption() if preemptible else None
    trainer = build_trainer(spec, data, tracker, name, callbacks, step_hook,
                            preemption.flag if preemption else stop_flag, cooldown, pause_at)
    try:
        result = preemption.run(trainer.fit) if preemption else trainer.fit()
    finally:
        if preemption is not None:
            preemption.close()
    m = result.metrics or {}
    if m.get("preempted"):
        raise Preempted(m["step"])
    if m.get("pausing"):
        raise Paused({**m, "checkpoint_path": result.checkpoint.path})
    best = best_intact(result.best_checkpoints)
    if best is None:
        raise RuntimeError(f"training run {name!r} reported no checkpoint that loads")
    checkpoint = hf_directory(best, tracker.uri if tracker else None)
    return TrainOutcome(steps=m["step"], val_loss=m["val_loss"], best_val_loss=m["best_val_loss"],
                        tokens_per_s=m["tokens_per_s"], checkpoint=checkpoint,
                        attempts=m["attempt"], resumed_from_step=m["resumed_from_step"],
                        stopped_early=m.get("stopped_early", False),
                        tracking_dropped=m.get("tracking_dropped", 0))


def best_intact(checkpoints: Sequence[tuple[Checkpoint, dict[str, Any]]]) -> Checkpoint | None:
    """The kept checkpoint with the lowest validation loss, skipping any set aside because
    it failed to load (Ray still lists those, with the loss they reported)."""
    ranked = sorted(checkpoints, key=lambda c: c[1].get("val_loss", math.inf))
    return next((c for c, _ in ranked if set_aside_reason(c) is None), None)


def hf_directory(checkpoint: Checkpoint, tracking_uri: str | None = None) -> str:
    """A local Hugging Face directory for a reported checkpoint: the checkpoint itself for
    DDP on local storage, else an export next to it (FSDP shards gathered into one file; a
    LoRA adapter merged into its base, fetched through `tracking_uri` when registered)."""
    local = checkpoint.filesystem.type_name == "local"
    if local and not (Path(checkpoint.path) / DCP_DIR).is_dir() \
            and not is_adapter_checkpoint(Path(checkpoint.path)):
        return checkpoint.path
    with checkpoint.as_directory() as d:
        root = Path(checkpoint.path).parent if local else Path("runs") / "exports"
        return str(export_hf(d, root / "hf" / Path(checkpoint.path).name, tracking_uri))
