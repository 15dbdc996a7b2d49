"""Train stage: Ray Train workers running data-parallel training of a HF causal LM."""

from lmforge.train.trainer import (
    ResumeError,
    RunExists,
    TrainOutcome,
    build_trainer,
    resumable_run,
    resume_state,
    run_exists,
    run_training,
)

__all__ = ["ResumeError", "RunExists", "TrainOutcome", "build_trainer", "resumable_run",
           "resume_state", "run_exists", "run_training"]
