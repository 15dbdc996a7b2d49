"""Registry stage: log a checkpoint as an MLflow `transformers` model, register it, alias it,
and load registered models back for serving (safetensors only)."""

from __future__ import annotations

import importlib.metadata as md
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmforge.config import RegistryConfig
from lmforge.tracking import RunTracker

# Pinned to what is installed: MLflow's default requirement probing imports torchvision,
# which this CPU stack does not have, and fails.
_REQUIREMENTS = ("transformers", "torch", "tokenizers", "safetensors")


def _pip_requirements() -> list[str]:
    return [f"{pkg}=={md.version(pkg).split('+')[0]}" for pkg in _REQUIREMENTS]


@dataclass(frozen=True)
class Registered:
    name: str
    version: int
    alias: str
    uri: str


def register(checkpoint_dir: str, tracker: RunTracker, cfg: RegistryConfig,
             tags: dict[str, Any], max_new_tokens: int) -> Registered:
    """Log the checkpoint under `tracker`'s run, register a new version, point the alias at it.

    `max_new_tokens` becomes the pyfunc default: without it MLflow's text generation runs
    past a small model's context.
    """
    import mlflow

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=tracker.run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=_pip_requirements(),
            model_config={"max_new_tokens": max_new_tokens, "do_sample": False},
            registered_model_name=cfg.model_name,
        )
    version = int(info.registered_model_version)
    client = MlflowClient(tracker.uri)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, str(version), key, str(value))
    client.set_registered_model_alias(cfg.model_name, cfg.alias, str(version))
    return Registered(cfg.model_name, version, cfg.alias, f"models:/{cfg.model_name}@{cfg.alias}")


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    """What `/v1/models` calls it: the registered name and version, or the directory name."""


def load_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Load `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...` or a local HF directory.

    Weights load from safetensors only (`use_safetensors=True` refuses pickle files).
    """
    if "://" not in uri and ":/" not in uri:
        path = Path(uri)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{uri}: not a Hugging Face model directory (no config.json)")
        return LoadedModel(*_load_dir(path, path), name=path.name)
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    name = uri
    if uri.startswith("models:/") and "@" in uri:
        model_name, alias = uri.removeprefix("models:/").split("@", 1)
        version = MlflowClient(tracking_uri).get_model_version_by_alias(model_name, alias)
        name = f"{model_name}/{version.version}"
    dst = tempfile.mkdtemp(prefix="lmforge-model-")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    # The transformers flavor keeps weights in model/ and the tokenizer in components/.
    return LoadedModel(*_load_dir(local / "model", local / "components" / "tokenizer"), name=name)


def _load_dir(model_dir: Path, tokenizer_dir: Path) -> tuple[PreTrainedModel,
                                                            PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
