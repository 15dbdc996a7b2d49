"""Registry stage: log a checkpoint as an MLflow `transformers` model, register it as the
`candidate`, gate its promotion to `champion` on held-out data, and load registered models
back for serving (safetensors only)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmforge.config import JobSpec, RegistryConfig, SpecError
from lmforge.data import PreparedData
from lmforge.data.blocks import ShardSet
from lmforge.data.chat import LOSS, POSITIONS, TOKENS
from lmforge.tracking import RunTracker
from lmforge.train.lora import ADAPTER_DIR, base_of

# Pinned to what is installed: MLflow's default requirement probing imports torchvision,
# which this CPU stack does not have, and fails.
_REQUIREMENTS = ("transformers", "torch", "tokenizers", "safetensors")


# transformers builds models under a process-global meta-device context, so two threads
# calling from_pretrained at once can end up with each other's unmaterialised weights
# (concurrent registrations hit this). Loads in one process take turns.
_LOAD_LOCK = threading.Lock()


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
    """Log the checkpoint under `tracker`'s run, register a new version, point `cfg.alias`
    (the candidate) at it. The champion alias moves only through `promote`. A LoRA run's
    checkpoint is its merged export: the adapter in it (`adapter/`) is logged beside the
    model, and the version is tagged with the base it was trained on and the adapter's URI.

    `max_new_tokens` becomes the pyfunc default: without it MLflow's text generation runs
    past a small model's context. Safe to call from several threads or processes at once:
    the registry store numbers versions in a transaction (retrying on conflict), and the
    fluent run stack `log_model` uses is thread-local.
    """
    import mlflow

    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    mlflow.set_tracking_uri(tracker.uri)
    # The fluent run `log_model` needs reopens the run and, leaving, ends it FINISHED:
    # a trial a budget stopped, already closed KILLED, keeps that status.
    ended = tracker.status()
    with mlflow.start_run(run_id=tracker.run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=_pip_requirements(),
            model_config={"max_new_tokens": max_new_tokens, "do_sample": False},
            registered_model_name=cfg.model_name,
        )
        adapter = Path(checkpoint_dir) / ADAPTER_DIR
        if adapter.is_dir():  # a LoRA run: the merged model above, its adapter beside it
            mlflow.log_artifacts(str(adapter), ADAPTER_DIR)
            tags = tags | {"lmforge.method": "lora", "lmforge.base_model": base_of(adapter),
                           "lmforge.adapter_uri": f"runs:/{tracker.run_id}/{ADAPTER_DIR}"}
    if ended in ("KILLED", "FAILED"):
        tracker.finish(ended)
    version = int(info.registered_model_version)
    client = MlflowClient(tracker.uri)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, str(version), key, str(value))
    set_alias(client, cfg.model_name, cfg.alias, version)
    return Registered(cfg.model_name, version, cfg.alias, f"models:/{cfg.model_name}@{cfg.alias}")


SPEC_TAG = "lmforge.spec"
"""Version tag holding the spec (JSON) the version was trained from: its lineage."""


def spec_tag(spec: JobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def by_alias(name: str, alias: str, tracking_uri: str) -> Registered:
    """The version `models:/NAME@ALIAS` points at now."""
    version = MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    return Registered(name, int(version.version), alias, f"models:/{name}@{alias}")


def trained_spec(name: str, alias: str, tracking_uri: str) -> JobSpec:
    """The spec `models:/NAME@ALIAS` was trained from (its SPEC_TAG); SpecError when the
    version carries none. MlflowException when there is no such model or alias."""
    version = MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    lineage = version.tags.get(SPEC_TAG)
    if not lineage:
        raise SpecError(f"version {version.version} of {name!r} has no {SPEC_TAG} tag; "
                        "pass --spec")
    return JobSpec.model_validate_json(lineage)


_UNIQUE_VIOLATION = ("UNIQUE constraint", "IntegrityError", "UniqueViolation", "Duplicate entry")


def set_alias(client: MlflowClient, name: str, alias: str, version: int,
              attempts: int = 5) -> None:
    """Point `alias` at `version`. MLflow's SQL store sets an alias by read-then-insert
    (`session.merge`), so two registrations creating the same alias at once collide on its
    unique key and one fails; that one retries, which is all the caller would do. Written
    here because MLflow does not retry it."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as e:
            collided = any(sign in str(e) for sign in _UNIQUE_VIOLATION)
            if not collided or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))  # back off from the colliding writer


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    """Which version this is: `NAME/VERSION` of a registered model, or the directory
    name; every response the endpoint gives with it reports it."""


def load_model(uri: str, tracking_uri: str | None = None, dst: str | None = None
               ) -> LoadedModel:
    """Load `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...` or a local HF directory.

    Weights load from safetensors only (`use_safetensors=True` refuses pickle files).
    Artifacts are downloaded under `dst`; by default into a temporary directory that is
    removed once the model is loaded, whether or not that succeeded (a serving replica
    loads every version its alias moves to: each left behind would be a full copy).
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
        uri = f"models:/{name}"  # download the version named, whatever the alias does next
    # Removing the temporary copy is safe once loaded: the weights the model maps from it
    # (safetensors) stay readable until the model is dropped, which frees the space.
    with (tempfile.TemporaryDirectory(prefix="lmforge-model-") if dst is None
          else contextlib.nullcontext(dst)) as where:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=where))
        # The transformers flavor keeps weights in model/ and the tokenizer in components/.
        return LoadedModel(*_load_dir(local / "model", local / "components" / "tokenizer"),
                           name=name)


def _load_dir(model_dir: Path, tokenizer_dir: Path) -> tuple[PreTrainedModel,
                                                            PreTrainedTokenizerBase]:
    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# --- registered models as a base to fine-tune ---------------------------------------


def is_model_uri(value: str | None) -> bool:
    return bool(value) and value.startswith("models:/")


def pinned(uri: str, tracking_uri: str | None) -> str:
    """`models:/NAME@ALIAS` as the `models:/NAME/VERSION` it points at now (other values
    unchanged), so every worker, restart and merge of a run uses the same version however
    the alias moves meanwhile."""
    if not is_model_uri(uri) or "@" not in uri:
        return uri
    name, alias = uri.removeprefix("models:/").split("@", 1)
    return f"models:/{name}/{by_alias(name, alias, tracking_uri).version}"


def local_model_dir(uri: str, tracking_uri: str | None, field: str,
                    root: Path | None = None) -> str:
    """A local Hugging Face directory (model and tokenizer) for `uri`: a local path or hub
    id as it is, a registered `models:/NAME/VERSION` (or `@ALIAS`) downloaded once per
    machine into `root` (default: the temp directory) and reused.

    Several workers on one machine may ask at once: each downloads to its own temporary
    sibling and renames it into place; the first rename wins, the others use it."""
    if not is_model_uri(uri):
        return uri
    if not tracking_uri:
        raise ValueError(f"{field}: {uri!r} is a registry URI, but this process has no "
                         "MLflow tracking URI to resolve it with")
    uri = pinned(uri, tracking_uri)
    name, _, version = uri.removeprefix("models:/").partition("/")
    where = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    target = (root or Path(tempfile.gettempdir()) / "lmforge-models") / where / name / version
    if (target / "config.json").exists():
        return str(target)
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        mlflow.set_tracking_uri(tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except MlflowException as e:
            raise ValueError(f"{field}: cannot download {uri!r} from {tracking_uri}: "
                             f"{e.message}") from None
        # The transformers flavor: weights in model/, the tokenizer in components/tokenizer/.
        flat = tmp / "hf"
        shutil.copytree(local / "model", flat)
        if (local / "components" / "tokenizer").is_dir():
            shutil.copytree(local / "components" / "tokenizer", flat, dirs_exist_ok=True)
        try:
            os.rename(flat, target)
        except OSError:  # another process got there first (the target exists): use it
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# --- promotion gate -------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    name: str
    candidate_version: int
    champion_version: int | None
    """The champion before the gate ran (None: there was none)."""
    candidate_loss: float
    champion_loss: float | None
    margin: float
    promoted: bool
    reason: str


class PromotionError(RuntimeError):
    """The gate cannot run: no such model, or no version carries the candidate alias."""


def heldout_text(data: PreparedData, max_chars: int) -> str:
    """The start of the spec's validation split as text: the same characters for every
    version, whatever its tokenizer."""
    tokenizer = data.tokenizer()
    ids = ShardSet(data, "validation", block_size=1).head(max_chars + 1)
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)[:max_chars]


@torch.no_grad()
def loss_per_char(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str,
                  batch_size: int = 16) -> float:
    """Mean next-token loss in nats per character of `text`, so versions with different
    tokenizers compare on the same footing. Non-overlapping windows of the model's context."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    context = int(getattr(model.config, "n_positions", 0) or model.config.max_position_embeddings)
    n_windows = (len(ids) - 1) // context
    if n_windows == 0:
        raise ValueError(f"held-out text of {len(text)} characters is shorter than one "
                         f"context of {context} tokens; raise registry.eval_chars")
    rows = ids[: n_windows * context + 1]
    x = rows[:-1].view(n_windows, context)
    y = rows[1:].view(n_windows, context)
    total = 0.0
    model.eval()
    for i in range(0, n_windows, batch_size):
        logits = model(input_ids=x[i : i + batch_size]).logits
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + batch_size].flatten(),
                                 reduction="sum").item()
    chars_per_token = len(text) / len(ids)
    return total / (y.numel() * chars_per_token)


Segments = list[tuple[str, bool]]
"""One held-out example as text pieces, each flagged when it is the assistant's."""


def heldout_examples(data: PreparedData, max_chars: int) -> list[Segments]:
    """Held-out instruction/chat examples as text (decoded with the entry's tokenizer, its
    special tokens kept), in order, until their assistant text reaches `max_chars`: every
    version is scored on the same characters, whatever its tokenizer. An example ends with
    its last assistant piece (what follows carries no loss; a row's padding is there)."""
    tokenizer = data.tokenizer()
    shards = ShardSet(data, "validation", block_size=data.manifest.block_size or 1)
    out: list[Segments] = []
    chars = 0
    for i in range(len(shards.shards)):
        for row in shards.array(i):
            tokens, positions, loss = (row[c].tolist() for c in (TOKENS, POSITIONS, LOSS))
            starts = [j for j, p in enumerate(positions) if p == 0] + [len(positions)]
            for a, b in zip(starts, starts[1:], strict=False):
                pieces: list[tuple[list[int], bool]] = []
                for j in range(a, b):
                    if pieces and pieces[-1][1] == bool(loss[j]):
                        pieces[-1][0].append(tokens[j])
                    else:
                        pieces.append(([tokens[j]], bool(loss[j])))
                while pieces and not pieces[-1][1]:
                    pieces.pop()
                if not pieces:
                    continue
                example = [(tokenizer.decode(ids), flag) for ids, flag in pieces]
                out.append(example)
                chars += sum(len(text) for text, flag in example if flag)
                if chars >= max_chars:
                    return out
    return out


@torch.no_grad()
def loss_per_assistant_char(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                            examples: list[Segments]) -> float:
    """Next-token loss on the assistant's text only, in nats per character of it: the
    gate's score for instruction/chat data. Each piece is encoded with the version's own
    tokenizer; an example longer than the model's context keeps its first context tokens."""
    context = int(getattr(model.config, "n_positions", 0) or model.config.max_position_embeddings)
    total, chars = 0.0, 0
    model.eval()
    for example in examples:
        ids: list[int] = []
        labels: list[int] = []
        for text, assistant in example:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            if assistant:  # its characters, or the share of them within the context
                kept = max(0, min(len(piece), context + 1 - len(ids)))
                chars += round(len(text) * kept / max(1, len(piece)))
            ids += piece
            labels += piece if assistant else [-100] * len(piece)
        ids, labels = ids[:context + 1], labels[:context + 1]
        if len(ids) < 2:
            continue
        logits = model(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits
        total += F.cross_entropy(logits[0], torch.tensor(labels[1:]), ignore_index=-100,
                                 reduction="sum").item()
    if chars == 0:
        raise ValueError("the held-out examples hold no assistant text to score; raise "
                         "registry.eval_chars or data.val_fraction")
    return total / chars


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def promote(name: str, data: PreparedData, cfg: RegistryConfig, tracking_uri: str) -> Decision:
    """Score `candidate` and `champion` on the same held-out text; move `champion` to the
    candidate only if its loss is lower by more than `cfg.promote_margin` (or there is no
    champion). The decision and both figures become tags on the candidate's version."""
    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        raise PromotionError(f"registered model {name!r} not found at {tracking_uri}") from e
    candidate = _version_by_alias(client, name, cfg.alias)
    if candidate is None:
        raise PromotionError(f"model {name!r} has no version with alias {cfg.alias!r}; "
                             f"register one first (lmforge train|tune)")
    champion = _version_by_alias(client, name, cfg.champion_alias)
    # Instruction/chat data: the loss on the assistant's held-out replies; text: on text.
    examples = heldout_examples(data, cfg.eval_chars) if data.manifest.rows else None
    text = heldout_text(data, cfg.eval_chars) if examples is None else "".join(
        piece for example in examples for piece, assistant in example if assistant)

    def score(version: str) -> float:
        with tempfile.TemporaryDirectory(prefix="lmforge-gate-") as tmp:
            loaded = load_model(f"models:/{name}/{version}", tracking_uri, dst=tmp)
        if examples is not None:
            return loss_per_assistant_char(loaded.model, loaded.tokenizer, examples)
        return loss_per_char(loaded.model, loaded.tokenizer, text)

    cand_loss = score(candidate.version)
    champ_loss = None
    if champion is None:
        promoted, reason = True, f"no {cfg.champion_alias} yet"
    elif champion.version == candidate.version:
        champ_loss = cand_loss
        promoted, reason = False, f"version {candidate.version} is already {cfg.champion_alias}"
    else:
        champ_loss = score(champion.version)
        promoted = cand_loss < champ_loss - cfg.promote_margin
        reason = (f"candidate {cand_loss:.4f} vs {cfg.champion_alias} {champ_loss:.4f} nats/char: "
                  f"{'better' if promoted else 'not better'} by more than the margin "
                  f"{cfg.promote_margin:g}")
    if promoted:
        client.set_registered_model_alias(name, cfg.champion_alias, candidate.version)
    decision = Decision(name, int(candidate.version),
                        int(champion.version) if champion is not None else None,
                        cand_loss, champ_loss, cfg.promote_margin, promoted, reason)
    tags = {"decision": "promoted" if promoted else "refused", "reason": reason,
            "candidate_loss": f"{cand_loss:.6f}",
            "champion_loss": "" if champ_loss is None else f"{champ_loss:.6f}",
            "champion_version": "" if champion is None else champion.version,
            "margin": f"{cfg.promote_margin:g}", "data_fingerprint": data.fingerprint,
            "eval_chars": str(len(text)), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate.version, f"lmforge.gate.{key}", value)
    client.update_model_version(name, candidate.version, description=(
        f"Promotion gate {tags['time']}: {tags['decision']} ({reason})."))
    return decision
