"""The job spec: one typed config tree, loaded from YAML plus `key.sub=value` overrides.

Every stage takes its own section of `JobSpec` as a typed argument. Validation happens
here, before any Ray process starts, and every error names the spec file and the field
path (`jobs/x.yaml: train.steps: Input should be greater than 0`).
"""

from __future__ import annotations

import glob
import math
import os
import re
from datetime import datetime
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lmforge.storage import StorageError
from lmforge.storage import resolve as resolve_storage


class SpecError(ValueError):
    """A job spec that cannot run. The message names the file and the field path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class DataConfig(Section):
    path: str | None = None
    """Local corpus: a file, a directory or a glob of .txt, .jsonl/.json or .parquet files.
    Relative paths resolve against the current directory. Unset (and no `hub_id`): Python's
    bundled documentation text (`pydoc_data.topics`), which needs no network."""
    hub_id: str | None = None
    """A Hugging Face Hub dataset id, for users with a network. Ignored when `path` is set."""
    hub_split: str = "train"
    """Split of the hub dataset to read."""
    text_field: str = "text"
    """Column holding the text in json/parquet/hub datasets (`format: text`)."""
    format: Literal["text", "instruction", "chat"] = "text"
    """What a record is. `text`: plain text, packed into one token stream (pretraining).
    `instruction`: alpaca records (`instruction`, optional `input` and `system`, `output`).
    `chat`: OpenAI `messages` ([{role: system|user|assistant, content}]) or ShareGPT
    `conversations` ([{from: system|human|gpt, value}]). Both fine-tuning formats read
    .jsonl/.json/.parquet files, are rendered with the tokenizer's chat template (an
    instruction record as a user turn and an assistant turn) and put the loss on the
    assistant's tokens only; a record missing a field, or with a role not listed, stops the
    stage with an error naming its file and field (docs/data.md#instruction-and-chat-data)."""
    chat_template: str | None = None
    """`instruction`/`chat`: a Jinja chat template, or the path of a `.jinja` file holding
    one. It must mark the assistant's text with `{% generation %}` so the loss can find it.
    It is saved with the tokenizer, so the registered model and `lmforge serve` render
    chats the same way. Unset: the tokenizer's own template, else lmforge's default
    (`<|user|>` / `<|assistant|>` turns, each reply ending with the end-of-text token)."""
    packing: bool = True
    """`instruction`/`chat`: several examples per training block (each attends only to itself
    and its positions start at 0, through position ids) instead of one example per block,
    padded. Packing wastes no compute on padding; the loss is the same either way."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """`instruction`/`chat`: an example longer than `model.block_size` + 1 tokens is cut to
    that length (`truncate`; dropped when no assistant token is left) or dropped (`drop`).
    Both are counted in the stage summary and the manifest (`stats`)."""
    sample_by: Literal["document", "paragraph", "line"] = "document"
    """For .txt files: one document per file, per blank-line paragraph, or per line.
    An end-of-text token separates documents in the packed stream."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Fraction of the documents held out for validation, chosen by a stable hash of each
    document's text (the same documents on every run and machine). A document longer than
    100,000 characters (a book, a one-file corpus such as tinyshakespeare) gives its last
    `val_fraction`, cut at a line end, to validation instead."""
    cache_dir: str = "runs/cache"
    """Where the token shards and their manifest are written, one entry per fingerprint: a
    local directory, a directory on a shared mount, or an object-store URI (`s3://BUCKET/
    PREFIX`, `gs://`, `abfs://`). On a cluster of several hosts it must be shared (checked
    before any worker starts)."""
    shard_tokens: int = Field(2**23, ge=1024)
    """Tokens per shard file (the last shard of each block of work holds the rest). 2**23
    tokens is 16 MB at uint16: a worker fetches a remote shard in well under a second, a
    10-billion-token corpus is ~1,200 files, and the windows lost at shard ends are ~1e-4."""
    block_bytes: int = Field(32 * 2**20, ge=1024)
    """Input bytes per block of work: one Ray Data task reads and packs a block, so this
    bounds each worker's memory, and a rerun after a kill skips every finished block."""
    fingerprint: Literal["listing", "content"] = "listing"
    """What names the cache entry besides the settings: `listing` (each file's path, size
    and modification time; nothing is read) or `content` (a hash of every file's bytes)."""

    @model_validator(mode="after")
    def _fine_tuning_fields_need_a_fine_tuning_format(self) -> DataConfig:
        if self.format == "text" and self.chat_template is not None:
            raise ValueError("data.chat_template is for data.format 'instruction' or 'chat', "
                             "not 'text'")
        if self.format != "text" and self.path is None:
            raise ValueError(f"data.path: data.format {self.format!r} reads .jsonl/.json/"
                             ".parquet records; set data.path to them")
        return self


class TokenizerConfig(Section):
    kind: Literal["bpe", "char", "pretrained"] = "bpe"
    """`bpe`: train a byte-level BPE tokenizer on the corpus; `char`: one token per
    character seen in the corpus; `pretrained`: load from `path`."""
    vocab_size: int = Field(2048, ge=260, le=1_000_000)
    """Vocabulary size for `bpe` (includes the 256 byte tokens and specials)."""
    path: str | None = None
    """Local tokenizer directory or hub id, for `kind: pretrained`."""
    train_sample_bytes: int = Field(64 * 2**20, gt=0)
    """`bpe` and `char` are trained on at most this many bytes of text, drawn from files
    spread over the corpus, so training the tokenizer costs the same on 1 GB and 1 TB. A
    `char` tokenizer maps characters its sample never saw to the end-of-text token."""

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> TokenizerConfig:
        if self.kind == "pretrained" and not self.path:
            raise ValueError("tokenizer.path is required when tokenizer.kind is 'pretrained'")
        return self


class ModelConfig(Section):
    arch: Literal["gpt2", "llama"] = "gpt2"
    """Architecture built from this config with random initialisation: `gpt2` (learned
    positions, GELU MLP, LayerNorm) or `llama` (RoPE, SwiGLU MLP, RMSNorm, grouped-query
    attention). Ignored when `pretrained` is set."""
    pretrained: str | None = None
    """The model to fine-tune instead of a random init: a local Hugging Face
    `AutoModelForCausalLM` directory, a model lmforge registered (`models:/NAME@ALIAS`, pinned
    to the version the alias names when the run starts, or `models:/NAME/VERSION`; every
    worker downloads it from the run's MLflow registry), or a hub id (with a network);
    weights load from safetensors only. Pair it with `tokenizer.kind: pretrained` and
    `tokenizer.path` naming the same model."""
    n_layer: int = Field(4, gt=0)
    """Transformer blocks."""
    n_head: int = Field(4, gt=0)
    """Attention heads per block; must divide `n_embd`."""
    n_kv_head: int | None = Field(None, gt=0)
    """`llama` only: key/value heads for grouped-query attention (default `n_head`); must
    divide `n_head`."""
    n_embd: int = Field(128, gt=0)
    """Hidden size."""
    intermediate_size: int | None = Field(None, gt=0)
    """MLP width (default 4 x `n_embd` for gpt2, about 8/3 x `n_embd` rounded to 64 for llama)."""
    block_size: int = Field(128, ge=8)
    """Context length: tokens per training sequence and the model's maximum positions."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention and residuals."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: PyTorch's scaled_dot_product_attention (fused, the default) or the
    reference implementation."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head "
                             f"({self.n_head})")
        return self


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    """Rank of each adapter's two factors (A: r x in, B: out x r)."""
    alpha: float = Field(16.0, gt=0)
    """Scale of the adapter's update: it is multiplied by alpha / r, so changing `r` at a
    fixed `alpha` keeps the update's size (and the learning rate that suits it) similar."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: list[str] | None = None
    """Names of the linear layers that get adapters (a layer matches when its name ends
    with one of these). Unset: every attention and MLP projection of the architecture:
    GPT-2 `c_attn`, `c_proj`, `c_fc`; Llama `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    `gate_proj`, `up_proj`, `down_proj`."""

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not m for m in v)):
            raise ValueError("must name at least one module, with no empty names")
        return v


class TrainConfig(Section):
    workers: int = Field(2, gt=0)
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each worker. Torch uses this many threads, rounded (at least 1):
    1.9 (with a trial driver's 0.1 on a 2-core machine) runs 2."""
    use_gpu: bool = False
    """One GPU per worker (NCCL) instead of CPU (gloo)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism: `ddp` replicates the model on every worker and all-reduces
    gradients; `fsdp` shards parameters, gradients and optimizer state across workers
    (FSDP2 `fully_shard` per transformer block, then the root). Both run on CPU (gloo) and
    GPU (nccl)."""
    method: Literal["full", "lora", "qlora"] = "full"
    """What training updates: `full` (every weight), `lora` (low-rank adapters on the
    layers `train.lora` names, the base weights frozen: only the adapters are trained, in
    the optimizer and in checkpoints; the registered model is the base with the adapters
    merged in) or `qlora` (`lora` over a 4-bit base: refused without `train.use_gpu: true`,
    with `train.strategy: fsdp`, without the `bitsandbytes` package, and, in this version,
    everywhere: the 4-bit load is not implemented yet). `lora` needs `model.pretrained`."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Adapter settings for `method: lora|qlora` (`train.lora.r`, ...; searchable like any
    field)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype. `bf16`/`fp16` run the forward pass under autocast (FSDP: a mixed
    precision policy) with fp32 master weights; `fp16` adds a gradient scaler."""
    steps: int = Field(200, gt=0)
    """Optimizer steps to run."""
    micro_batch_size: int = Field(12, gt=0)
    """Sequences per worker per micro-step."""
    grad_accum: int = Field(1, gt=0)
    """Micro-steps per optimizer step, gradients synchronised on the last only;
    global batch = micro_batch_size * grad_accum * workers."""
    lr: float = Field(1e-3, gt=0, le=1.0)
    """Peak learning rate, reached after warmup."""
    min_lr: float | None = Field(None, ge=0)
    """Learning rate at the end of the decay, cosine or WSD (default lr / 10)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps from 0 to `lr`."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """Learning-rate schedule after warmup: `cosine` decays to `min_lr` over the remaining
    steps; `wsd` (warmup-stable-decay) holds `lr` constant, then decays to `min_lr` over
    the last `decay_fraction` of the steps with `decay_shape`. A WSD run can be cooled
    down from any point of its stable phase, which is what `tune.rung_cooldown` does."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """`wsd`: fraction of `steps` (rounded, at least 1 step) over which the LR decays to
    `min_lr` at the end of the run."""
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
    """Shape of a decay to `min_lr` (the `wsd` schedule's and a `tune.rung_cooldown`
    fork's): `linear`, or `1-sqrt` (lr = min_lr + (lr - min_lr) * (1 - sqrt(progress))),
    which Hägele et al. 2024 (arXiv 2405.18392) found to match or beat cosine."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, applied to 2-D weights only."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    fused_optimizer: bool = True
    """Use the fused AdamW kernel (one kernel for all parameters) where the device has one."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, more compute."""
    compile: bool = False
    """`torch.compile` the model (a warm-up of tens of seconds, then faster steps)."""
    eval_every: int = Field(50, gt=0)
    """Steps between validation passes (the last step is always evaluated)."""
    eval_batches: int = Field(10, gt=0)
    """Validation batches per rank per pass (a fixed set, so passes are comparable)."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations in a row without a new best validation loss
    (by more than `early_stopping_min_delta`). Unset: always run `steps`."""
    early_stopping_min_delta: float = Field(0.0, ge=0)
    """Improvement in validation loss that counts as a new best for early stopping."""
    log_every: int = Field(10, gt=0)
    """Steps between training-metric logs (loss, LR, tokens/s, step time, MFU, memory)."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s of one device at the training precision, for MFU. Default: looked up for
    known GPUs (A100, H100, H200, ...); unset on CPU, where MFU is then not reported."""
    checkpoint_every: int | None = Field(None, gt=0)
    """Steps between checkpoints (default `eval_every`); each one also evaluates, so every
    checkpoint has a validation loss to rank it by. A killed worker redoes at most this
    many steps."""
    samples: int = Field(3, ge=0, le=32)
    """Completions logged to MLflow at each evaluation (a table `samples.json`: step, prompt,
    completion), greedy, by rank 0: the first this many held-out examples' prompts
    (instruction/chat data) or validation blocks' opening tokens (text). 0 turns them off."""
    sample_prompts: list[str] | None = None
    """Fixed prompts for the samples instead of held-out ones (for instruction/chat data each
    is a user turn, rendered by the chat template as `/v1/chat/completions` does)."""
    sample_max_tokens: int = Field(32, gt=0, le=512)
    """New tokens per sample at most (a completion also ends at the end-of-text token)."""
    seed: int = 1337
    """Seed for initialisation and data order."""
    storage_path: str = "runs/ray"
    """Where Ray Train persists checkpoints and results: a local directory, a shared mount,
    or an object-store URI (`s3://BUCKET/PREFIX`, `gs://`, `abfs://`; S3-compatible stores
    through `AWS_ENDPOINT_URL`). On a cluster of several hosts it must be shared."""
    keep_checkpoints: int = Field(2, gt=0)
    """Checkpoints kept: the best this many by validation loss, plus always the latest (the
    one a restart resumes from), through Ray Train's `CheckpointConfig`."""
    max_failures: int = Field(2, ge=-1)
    """Times Ray Train restarts the worker group after a worker dies (-1: no limit); each
    restart resumes from the latest checkpoint (or, when that one does not load, the next
    newest kept one), so at most `checkpoint_every` steps are redone."""
    scheduling_timeout_s: float | None = Field(None, gt=0)
    """Seconds to wait for an autoscaler to add the nodes a run (or one trial) needs, then
    give up. Where Ray reports an autoscaler's limits (autoscaler v2, as KubeRay runs it),
    unset means 600. A cluster that reports none is taken as fixed: a run it cannot hold
    fails at once, unless this is set (an autoscaler v1 cluster, such as `ray up` with
    cluster/launcher/, whose limits Ray does not publish)."""

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must be less than train.steps "
                f"({self.steps})"
            )
        if self.method == "qlora" and not self.use_gpu:
            raise ValueError("train.method: 'qlora' quantises the base model with bitsandbytes, "
                             "which needs a GPU: set train.use_gpu: true, or use "
                             "train.method: lora on CPU")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.schedule == "wsd" and self.warmup_steps > self.steps - self.decay_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) overlaps the wsd decay (the last "
                f"{self.decay_steps} of train.steps {self.steps}, from train.decay_fraction "
                f"{self.decay_fraction}): shorten one of them")
        return self

    @property
    def decay_steps(self) -> int:
        """`wsd`: the steps at the end of the run over which the LR decays."""
        return max(1, round(self.decay_fraction * self.steps))

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_every

    @property
    def threads(self) -> int:
        """Torch threads per worker: cpus_per_worker rounded half up, at least 1."""
        return max(1, math.floor(self.cpus_per_worker + 0.5))


class LogUniform(Section):
    type: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class Uniform(Section):
    type: Literal["uniform"]
    low: float
    high: float


class IntRange(Section):
    type: Literal["int"]
    low: int
    high: int
    """Inclusive upper bound."""


class Choice(Section):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


_DIM_TAGS = {"loguniform", "uniform", "int", "choice"}
SearchDim = Annotated[LogUniform | Uniform | IntRange | Choice, Field(discriminator="type")]


class TuneConfig(Section):
    enabled: bool = False
    """Run a hyperparameter search in `lmforge run` (`lmforge tune` always searches)."""
    num_trials: int = Field(4, gt=0)
    """Trials to sample; each is a distributed training run with `train.workers` workers."""
    max_tokens: int | None = Field(None, gt=0)
    """Budget in training tokens, summed over all trials: once reached, the search stops
    (running trials included). Unset: no token budget."""
    time_budget_s: float | None = Field(None, gt=0)
    """Budget in wall-clock seconds for the whole search (Tune's `time_budget_s`); trials
    still running then are stopped. Unset: no time budget."""
    max_concurrent_trials: int = Field(1, gt=0)
    """Trials running at once (each needs driver_cpus + workers * cpus_per_worker)."""
    metric: Literal["val_loss"] = "val_loss"
    """Metric the search minimises."""
    multi_objective: bool = False
    """Also maximise `tokens_per_s`: Optuna's multi-objective TPE over (val_loss,
    tokens_per_s), and the summary lists the Pareto set. ASHA is off then (a rung ranks by
    one metric, which would cut fast trials off the Pareto front)."""
    searcher: Literal["tpe", "random"] = "tpe"
    """Optuna sampler: `tpe` (learns from finished trials) or `random` (a baseline); both
    seeded by `tune.seed`."""
    scheduler: Literal["asha", "sha", "fifo"] = "asha"
    """`asha` stops weak trials at rungs of `grace_period * reduction_factor^k` steps, as
    they arrive (Ray's asynchronous ASHA: the first trials to reach a rung always go on);
    `sha` is synchronous successive halving on the same rungs: every trial waits (paused,
    checkpointed) at a rung until all have reached it, then the best 1/reduction_factor
    go on and the rest stop (the whole `num_trials` form one bracket, so the searcher
    learns only from trials that ended; `lmforge.tune.halving`); `fifo` runs every trial
    to `train.steps`."""
    search_space: dict[str, SearchDim] = Field(default_factory=dict)
    """Dotted spec path (e.g. `train.lr`) to a distribution:
    `{type: loguniform|uniform, low, high}`, `{type: int, low, high}`, `{type: choice, values}`."""
    grace_period: int = Field(50, gt=0)
    """ASHA: steps every trial runs before it can be stopped. Too early and the first rung
    ranks trials unlike their end (short-horizon bias: a high learning rate is behind early
    and ahead at the end); `bench/tune.py efficiency` prints how each step's ranking agrees
    with the final one."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA and SHA: keep the top 1/reduction_factor of trials at each rung."""
    rung_cooldown: float | None = Field(None, gt=0, le=1)
    """Score each rung (`grace_period * reduction_factor^k` steps, below `train.steps`)
    after a cooldown, as this fraction of the rung's steps (0.1-0.2, say): the trial forks
    its state in memory, decays the LR from its current value to `train.min_lr` over
    that many steps on the next training batches, evaluates the fork, reports that loss to
    ASHA and the searcher (`search_loss`), then restores its own state exactly and goes on.
    The forks' steps count in `tokens` and `tune.max_tokens`. Counters short-horizon bias,
    best with `train.schedule: wsd`. With `scheduler: fifo` the forks still run and are
    recorded, but stop nothing. Unset: rungs score the trial's own val_loss."""
    startup_trials: int | None = Field(None, ge=1)
    """TPE: trials sampled at random before TPE models the results. Unset: a third of
    `num_trials`, at least 2 and at most 10 (Optuna's own default of 10 would leave a
    12-trial search almost entirely random)."""
    seed: int = 0
    """Seed of the Optuna TPE sampler, so a search is reproducible."""
    driver_cpus: float = Field(0.1, gt=0)
    """CPUs reserved for each trial's driver function (Ray refuses 0)."""
    trial_timeout_s: float | None = Field(None, gt=0)
    """Wall-clock seconds one trial may take from its start (waiting for its workers
    included): past it the trial ends as FAILED, its training run stopped and its MLflow
    run FAILED, and the search goes on with the next trial. Unset: no limit."""
    storage_path: str = "runs/ray"
    """Where Ray Tune keeps the experiment state (`lmforge tune --resume` restores it): a
    local directory, a shared mount, or an object-store URI, like `train.storage_path`."""


class TrackingConfig(Section):
    uri: str | None = None
    """MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db
    with artifacts in runs/mlartifacts/."""
    experiment: str = "lmforge"
    """MLflow experiment name."""
    run_name: str | None = None
    """Name of the run (and its directory under runs/ and the storage paths): letters,
    digits, `-`, `_` and `.`, starting with a letter or digit, at most 128 characters.
    Default: spec name + timestamp."""
    system_metrics_interval_s: float = Field(10.0, ge=0)
    """Seconds between MLflow system-metric samples (CPU, memory, disk, network) on the
    search's parent run and every trial's run; 0 turns them off."""
    buffer_size: int = Field(10_000, gt=0)
    """Metric values a training run holds for MLflow while the tracking server is away
    (rank 0 sends them from a background thread, so training never waits for MLflow); past
    it the oldest are dropped with a warning and counted (`tracking_dropped` in the run
    summary, `tracking/dropped` in the run once the server is back)."""
    flush_timeout_s: float = Field(30.0, ge=0)
    """At the end of training, seconds rank 0 waits for buffered metrics to reach MLflow;
    what is still unsent then counts as dropped."""


    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_plain_name(cls, v: str | None) -> str | None:
        if v is not None and not RUN_NAME.fullmatch(v):
            raise ValueError("must be letters, digits, '-', '_' or '.', start with a letter "
                             "or digit and have at most 128 characters (it names directories)")
        return v


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RegistryConfig(Section):
    enabled: bool = True
    """Register the trained (or best tuned) model in the MLflow model registry."""
    model_name: str = "lmforge-model"
    """Registered model name."""
    alias: str = "candidate"
    """Alias pointed at each newly registered version."""
    champion_alias: str = "champion"
    """Alias of the version in service; only the promotion gate moves it."""
    promote: bool = True
    """After registering, run the promotion gate (`lmforge promote`): the candidate becomes
    champion when it beats the current one by `promote_margin`, or when there is none."""
    promote_margin: float = Field(0.0, ge=0)
    """How much lower (nats per character of held-out text) the candidate's loss must be
    than the champion's for the gate to promote it."""
    eval_chars: int = Field(20_000, gt=0)
    """Characters of held-out text (the start of the spec's validation split) that the
    gate scores both versions on."""


def check_api_keys(keys: list[str]) -> None:
    """ValueError for a key no request could present (`Bearer ` with nothing after it
    would match an empty one; HTTP strips a header's surrounding whitespace). The
    message names the entry's position, never a key."""
    for i, key in enumerate(keys):
        if not key or key != key.strip():
            raise ValueError(f"entry {i + 1} is "
                             f"{'empty' if not key.strip() else 'padded with whitespace'}; "
                             "every API key must be non-empty, without surrounding "
                             "whitespace")


class ServeConfig(Section):
    enabled: bool = True
    """In `lmforge run`: deploy the registered model, send one completion, shut down."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    min_replicas: int = Field(1, ge=1)
    """Autoscaling lower bound."""
    max_replicas: int = Field(1, ge=1)
    """Autoscaling upper bound."""
    target_ongoing_requests: float = Field(4, gt=0)
    """Autoscaling target of in-flight requests per replica."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """How long load must stay above target before the autoscaler adds replicas."""
    downscale_delay_s: float = Field(600.0, ge=0)
    """How long load must stay below target before the autoscaler removes replicas."""
    look_back_period_s: float = Field(30.0, gt=0)
    """Window over which the autoscaler averages in-flight requests: shorter follows load
    (and its end) sooner, longer rides out bursts. Load is reported at least twice per
    window."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Most requests one replica works on at once (decoding or waiting for a batch). A
    request takes one of these slots only once its whole body is in: those still sending
    count against `max_receiving_requests` instead."""
    max_receiving_requests: int = Field(128, ge=1)
    """Most requests one replica holds while their bodies arrive, apart from
    `max_ongoing_requests`, so that slow senders (each for up to `body_timeout_s`) cannot
    take the slots of requests ready to run. Beyond it a request is refused at once with
    `backpressure_status`."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting for a slot, in front of the replicas when all are full and, once
    their body is in, in each replica; beyond it a request is refused at once with
    `backpressure_status`. -1: no limit."""
    backpressure_status: Literal[503, 429] = 503
    """HTTP status of a request refused because the queue is full."""
    retry_after_s: float | None = Field(1.0, ge=0)
    """`Retry-After` seconds sent with a refused request; unset: no header."""
    request_timeout_s: float | None = Field(300.0, gt=0)
    """End-to-end limit for one HTTP request, queueing and a streamed answer included;
    past it the answer is 408 (a stream already under way is cut short). Each replica
    holds it too, so a client cannot lift it. Unset (null): no limit."""
    body_timeout_s: float = Field(30.0, gt=0)
    """Longest a client may take to send its request body; past it the answer is 408. A
    request reaches the model only with its whole body, so a slow sender holds no decode
    row, and one of a replica's `max_ongoing_requests` at most this long."""
    max_body_bytes: int = Field(1_000_000, ge=1)
    """Largest request body accepted; a larger one gets 413."""
    health_check_period_s: float = Field(10.0, gt=0)
    """How often Serve checks each replica. A replica fails the check when its decode loop
    died, a decode step has run over `stall_timeout_s`, or it does not answer within
    `health_check_timeout_s`; after 3 failures in a row Serve replaces it."""
    health_check_timeout_s: float = Field(30.0, gt=0)
    """How long a health check may take before it counts as failed."""
    stall_timeout_s: float = Field(60.0, gt=0)
    """Longest a single decode step may run before the replica reports itself stalled."""
    alias_poll_s: float = Field(10.0, ge=0)
    """Serving `models:/NAME@ALIAS`: how often each replica checks whether the alias
    moved, and if so loads the new version and sends new requests to it (requests already
    running finish on the old one). A version that fails to load is tried again after a
    wait doubling from this up to 10 minutes, the current version serving meanwhile.
    0: never."""
    max_batch_size: int = Field(8, ge=1)
    """Most sequences a replica decodes together. Batching is continuous: a request
    joins the running batch at the next token while a row is free."""
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    """How long `@serve.batch` waits for more requests before admitting the ones that
    arrived (they are prefilled together). 0: admit at once; requests that arrive
    during a decode step are gathered anyway."""
    max_tokens_limit: int = Field(512, ge=1)
    """Largest `max_tokens` a request may ask for."""
    cpus_per_replica: float = Field(1.0, gt=0)
    """CPUs reserved for each replica."""
    gpus_per_replica: float = Field(0.0, ge=0)
    """GPUs reserved for each replica (fractions share one). A replica given a GPU decodes
    on it; without one it decodes on its CPUs."""
    api_keys: list[str] = Field(default_factory=list, exclude=True, repr=False)
    """Bearer keys for the endpoint; empty list: no auth. With keys, a request without
    `Authorization: Bearer KEY` gets 401 on every route but /healthz, /readyz and the
    playground page (/). Each key must be non-empty, without leading or trailing
    whitespace. Keys from $LMFORGE_API_KEYS (comma-separated) are added wherever the
    serving app is built. A secret: never dumped, so never in MLflow params, registry
    tags or `validate` output."""

    @field_validator("api_keys")
    @classmethod
    def _keys_usable(cls, keys: list[str]) -> list[str]:
        check_api_keys(keys)
        return keys

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.min_replicas ({self.min_replicas}) must not exceed serve.max_replicas "
                f"({self.max_replicas})"
            )
        return self


class JobSpec(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _adapters_have_a_base(self) -> JobSpec:
        if self.train.method != "full" and not self.model.pretrained:
            raise ValueError(f"train.method: {self.train.method!r} trains adapters on a "
                             "pretrained base: set model.pretrained (a local Hugging Face "
                             "directory, models:/NAME@ALIAS or models:/NAME/VERSION)")
        return self

    @model_validator(mode="after")
    def _search_paths_exist(self) -> JobSpec:
        for key, dim in self.tune.search_space.items():
            if not _is_field_path(self, key):
                raise ValueError(f"tune.search_space: {key!r} is not a spec field path")
            if isinstance(dim, LogUniform | Uniform | IntRange) and dim.low >= dim.high:
                raise ValueError(f"tune.search_space.{key}: low must be less than high")
        if self.tune.rung_cooldown is not None and self.tune.multi_objective:
            raise ValueError("tune.rung_cooldown: not with tune.multi_objective (ASHA, whose "
                             "rungs it scores, is off then)")
        return self

    def with_values(self, values: dict[str, Any]) -> JobSpec:
        """A copy with dotted-path values applied (and validated), e.g. a trial's sample."""
        raw = self.model_dump(mode="json")
        for key, value in values.items():
            _set_dotted(raw, key, value)
        return JobSpec.model_validate(raw)


def _is_field_path(spec: JobSpec, key: str) -> bool:
    """Whether a dotted path (`train.lr`, `train.lora.r`) names a leaf field of the spec:
    it goes through sections only and ends at a field that is not one."""
    node: Any = spec
    parts = key.split(".")
    for part in parts:
        if not isinstance(node, Section) or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return len(parts) > 1 and not isinstance(node, Section)


_SEARCH_SPACE = "tune.search_space."


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith(_SEARCH_SPACE):  # its keys are dotted paths themselves: train.lr
        parents, leaf = ["tune", "search_space"], key.removeprefix(_SEARCH_SPACE)
    else:
        *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"override {key}: {part!r} is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.steps=10", "model.n_layer=2"]` -> {"train.steps": 10, ...} (YAML-typed values)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or " " in key:
            raise SpecError(f"override {item!r}: expected key.sub=value")
        try:
            parsed[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise SpecError(f"override {item!r}: value is not valid YAML: {e}") from e
    return parsed


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        # Discriminated unions add the tag to the location; keep the path a user wrote.
        if parts[:2] == ["tune", "search_space"] and len(parts) > 3 and parts[3] in _DIM_TAGS:
            del parts[3]
        loc = ".".join(parts)
        msg = e["msg"].removeprefix("Value error, ")
        where = f"{loc}: " if loc else ""
        got = f" (got {e['input']!r})" if e["type"] not in {"missing", "value_error"} else ""
        if e["type"] == "extra_forbidden":
            msg, got = "unknown field", ""
        lines.append(f"{source}: {where}{msg}{got}")
    return "\n".join(lines)


def load(path: str | Path | None, overrides: list[str] | None = None,
         name_run: bool = True) -> JobSpec:
    """Read, override and validate a job spec. Raises SpecError naming file and field.
    With `name_run`, an unset `tracking.run_name` gets `default_run_name(path)`."""
    source = str(path) if path else "<defaults>"
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SpecError(f"{source}: cannot read spec: {e.strerror}") from e
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise SpecError(f"{source}: invalid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: the spec must be a mapping of sections")
    try:
        for key, value in parse_overrides(overrides or []).items():
            _set_dotted(raw, key, value)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from e
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_format_errors(source, e)) from None
    _check_corpus(spec.data, source)
    _make_paths_absolute(spec, source)
    if name_run and spec.tracking.run_name is None:
        spec.tracking.run_name = default_run_name(path)
    return spec


def default_run_name(path: str | Path | None) -> str:
    """`SPEC_STEM-YYYYmmdd-HHMMSS`: `--resume` without a name continues the newest of these."""
    return f"{run_name_stem(path)}-{datetime.now():%Y%m%d-%H%M%S}"


def run_name_stem(path: str | Path | None) -> str:
    """The spec file's name as the start of a valid run name (`jobs/my spec.yaml` ->
    `my-spec`)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(path).stem if path else "lmforge")
    return stem.lstrip("-_.")[:100] or "lmforge"


def _make_paths_absolute(spec: JobSpec, source: str) -> None:
    """Resolve local paths against the current directory once, here: Ray workers, trial
    drivers and replicas run with other working directories. The storage fields go through
    `storage.resolve`, which keeps an object-store URI verbatim and refuses an unknown
    scheme naming the field."""
    for section, field in (("data", "cache_dir"), ("train", "storage_path"),
                           ("tune", "storage_path")):
        owner = getattr(spec, section)
        try:
            setattr(owner, field, resolve_storage(getattr(owner, field), f"{section}.{field}").uri)
        except StorageError as e:
            raise SpecError(f"{source}: {e}") from None
    if spec.data.path is not None and "://" not in spec.data.path:
        spec.data.path = str(Path(spec.data.path).expanduser().resolve())
    # A pretrained model is a local directory or a hub id: only an existing path is resolved.
    for owner in (spec.model, spec.tokenizer):
        name = "pretrained" if owner is spec.model else "path"
        value = getattr(owner, name)
        if value is not None and Path(value).expanduser().exists():
            setattr(owner, name, str(Path(value).expanduser().resolve()))


def _check_corpus(data: DataConfig, source: str) -> None:
    if data.path is None or "://" in data.path:  # an object store is listed by the stage
        return
    if not corpus_files(data.path):
        raise SpecError(f"{source}: data.path: no corpus file found at {data.path!r}")


def corpus_files(path: str) -> list[str]:
    """Files a `data.path` names: itself, the supported files in a directory, or a glob."""
    p = Path(path).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return sorted(
            str(f) for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES
        )
    return sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True)
                  if os.path.isfile(f))


_SUFFIXES = {".txt", ".text", ".md", ".json", ".jsonl", ".parquet"}


def resolve_tracking_uri(tracking: TrackingConfig, runs_dir: Path) -> str:
    """The tracking URI every process uses, made absolute so no process depends on its cwd."""
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:  # a bare directory: MLflow's file store
        return str(Path(uri).resolve())
    return uri


def spec_reference() -> str:
    """The spec's fields as Markdown tables, from the models' own docstrings (README uses it)."""
    out = []
    for section, field in JobSpec.model_fields.items():
        model = field.annotation
        out += [f"#### `{section}`", "", "| field | type | default | meaning |",
                "| --- | --- | --- | --- |"]
        out += _reference_rows(section, model)
        out.append("")
    return "\n".join(out)


def _reference_rows(prefix: str, model: type[BaseModel]) -> list[str]:
    """One row per field; a nested section (`train.lora`) gets a row, then its fields'."""
    rows = []
    for name, f in model.model_fields.items():
        nested = isinstance(f.annotation, type) and issubclass(f.annotation, Section)
        kind = "section" if nested else _type_name(f.annotation).replace("|", "\\|")
        default = "" if nested else \
            f"`{(f.default_factory() if f.default_factory else f.default)!r}`"
        doc = " ".join((f.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}.{name}` | {kind} | {default} | {doc} |")
        if nested:
            rows += _reference_rows(f"{prefix}.{name}", f.annotation)
    return rows


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if annotation is None or annotation is type(None):
        return "None"
    if get_origin(annotation) in (UnionType, Union):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if get_origin(annotation) is dict:
        return "mapping"
    if get_origin(annotation) is tuple:
        return "[" + ", ".join(_type_name(a) for a in get_args(annotation)) + "]"
    return getattr(annotation, "__name__", str(annotation))


REFERENCE_MARKERS = ("<!-- spec-reference:start -->", "<!-- spec-reference:end -->")


def with_spec_reference(readme: str) -> str:
    """`readme` with the text between the spec-reference markers replaced by the tables."""
    start, end = REFERENCE_MARKERS
    head, _, rest = readme.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{spec_reference()}{end}{tail}"
