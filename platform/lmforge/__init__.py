"""lmforge: train, tune, track and serve language models on Ray from one YAML job spec."""

__version__ = "0.1.0"
