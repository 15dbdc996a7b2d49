"""Train stage: Ray Train workers running data-parallel training of a HF causal LM."""

from lmforge.train.trainer import TrainOutcome, build_trainer, run_training

__all__ = ["TrainOutcome", "build_trainer", "run_training"]
