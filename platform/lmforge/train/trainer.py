"""Build and run the Ray Train `TorchTrainer` for a spec."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from lmforge.config import JobSpec
from lmforge.data import PreparedData
from lmforge.storage import require_shared
from lmforge.tracking import RunTracker
from lmforge.train.checkpoint import DCP_DIR, export_hf
from lmforge.train.loop import train_fn_per_worker

RUN_STATE_FILE = "lmforge_run.json"
"""Written into the run's storage directory: the MLflow run a `--resume` continues."""


class RunExists(RuntimeError):
    """A run of this name already has state in storage and resuming was not asked for."""


class ResumeError(RuntimeError):
    """`--resume` cannot continue: no run or search to continue, or one that the spec
    contradicts."""


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
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
        ),
    )


def _storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and root path of a local path or a URI (s3://, gs://, ...)."""
    if "://" in storage_path:
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), storage_path


def run_exists(storage_path: str, name: str) -> bool:
    """Whether Ray Train has state for run `name` under `storage_path` (local or a URI)."""
    fs, root = _storage(storage_path)
    return fs.get_file_info(f"{root.rstrip('/')}/{name}").type != pyarrow.fs.FileType.NotFound


def run_started(storage_path: str, name: str) -> bool:
    """Whether run `name` got as far as recording its MLflow run, so it can be resumed."""
    fs, root = _storage(storage_path)
    return fs.get_file_info(f"{root}/{name}/{RUN_STATE_FILE}").type == pyarrow.fs.FileType.File


def resumable_run(storage_path: str, name: str, spec_stem: str) -> str:
    """The run `--resume` continues: `name` when it has been started, else the newest run
    of this spec file (`SPEC_STEM-<timestamp>`) under `storage_path`."""
    if run_started(storage_path, name):
        return name
    fs, root = _storage(storage_path)
    found = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(
        root, allow_not_found=True)) if i.base_name.startswith(f"{spec_stem}-")
        and run_started(storage_path, i.base_name))
    if not found:
        raise ResumeError(f"train.storage_path {storage_path}: no run named {name!r} or "
                          f"{spec_stem}-* to resume; start one with `lmforge train` first")
    return found[-1]  # the names end in a sortable timestamp


def resume_state(storage_path: str, name: str) -> dict[str, str]:
    """MLflow run id, experiment id and tracking URI recorded when the run started."""
    fs, root = _storage(storage_path)
    with fs.open_input_stream(f"{root}/{name}/{RUN_STATE_FILE}") as f:
        return json.loads(f.read())


def _record_run(storage_path: str, name: str, tracker: RunTracker) -> None:
    fs, root = _storage(storage_path)
    fs.create_dir(f"{root}/{name}", recursive=True)
    experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
    with fs.open_output_stream(f"{root}/{name}/{RUN_STATE_FILE}") as f:
        f.write(json.dumps({"parent_run_id": tracker.run_id, "experiment_id": experiment,
                            "tracking_uri": tracker.uri}).encode())


def run_training(spec: JobSpec, data: PreparedData, tracker: RunTracker | None, name: str,
                 callbacks: Sequence[UserCallback] = (), resume: bool = False) -> TrainOutcome:
    """Train to `train.steps` (or an early stop). Ray Train restores a run from the state it
    finds in storage under `name`, so an existing run continues only when `resume` is set;
    otherwise it is refused rather than silently continued."""
    if not resume and run_exists(spec.train.storage_path, name):
        raise RunExists(
            f"run {name!r} already exists under train.storage_path ({spec.train.storage_path});"
            " pass --resume to continue it, or set another tracking.run_name")
    if tracker is not None and not resume:
        _record_run(spec.train.storage_path, name, tracker)
    result = build_trainer(spec, data, tracker, name, callbacks).fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {name!r} reported no checkpoint")
    m = result.metrics
    return TrainOutcome(steps=m["step"], val_loss=m["val_loss"], best_val_loss=m["best_val_loss"],
                        tokens_per_s=m["tokens_per_s"], checkpoint=hf_directory(best),
                        attempts=m["attempt"], resumed_from_step=m["resumed_from_step"],
                        stopped_early=m.get("stopped_early", False))


def hf_directory(checkpoint) -> str:
    """A local Hugging Face directory for a reported checkpoint: the checkpoint itself for
    DDP on local storage, else an export next to it (FSDP shards gathered into one file)."""
    local = checkpoint.filesystem.type_name == "local"
    if local and not (Path(checkpoint.path) / DCP_DIR).is_dir():
        return checkpoint.path
    with checkpoint.as_directory() as d:
        root = Path(checkpoint.path).parent if local else Path("runs") / "exports"
        return str(export_hf(d, root / "hf" / Path(checkpoint.path).name))
