"""Train stage: Ray Train workers running data-parallel training of a HF causal LM.

The Ray-facing names below import on first use, so `lmforge.train.step` and
`lmforge.train.parallel` stay importable where Ray is not installed (bench/train_gpu.py).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Paused", "Preempted", "TrainOutcome", "build_trainer", "run_training"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("lmforge.train.trainer"), name)
    raise AttributeError(f"module 'lmforge.train' has no attribute {name!r}")
