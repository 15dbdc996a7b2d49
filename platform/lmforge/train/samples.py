"""Completions of a fixed prompt set at each evaluation, for MLflow's table view: what a
user reads to see the model change across steps and trials.

The prompts are `train.sample_prompts` (a chat or instruction entry renders each as a
user turn through the tokenizer's chat template, as `/v1/chat/completions` does), else
the first `train.samples` held-out examples' prompts (an example's tokens before its first
assistant token), or, for a text entry, the opening tokens of `train.samples` validation
blocks spread over the split. The same prompts at every evaluation and in every trial.

Greedy decoding without a KV cache, a few prompts of at most `train.sample_max_tokens`
new tokens: milliseconds for the debug model, about a second for GPT-2 124M on a GPU, at
each evaluation only. Under FSDP every rank must run the forward passes (each holds a shard
of the weights), so every rank decodes the same prompts; otherwise rank 0 alone does.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.config import TrainConfig
from lmforge.data.blocks import ShardSet
from lmforge.data.manifest import PreparedData

TEXT_PROMPT_TOKENS = 16
"""Tokens of a validation block a text entry's default prompt takes."""
ARTIFACT = "samples.json"
"""The run's table artifact; each evaluation appends its rows."""


@dataclass(frozen=True)
class Prompt:
    text: str
    """As the table shows it (the rendered template for chat prompts)."""
    ids: tuple[int, ...]


def sample_prompts(data: PreparedData, cfg: TrainConfig, block_size: int,
                   tokenizer: Any) -> list[Prompt]:
    """The run's fixed prompts (see the module docstring); [] when samples are off."""
    if cfg.sample_prompts is not None:
        out = []
        for text in cfg.sample_prompts:
            if data.manifest.rows:
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True,
                                                     tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"train.sample_prompts: {text!r} encodes to no tokens")
            out.append(Prompt(text, tuple(ids)))
        return out
    if cfg.samples == 0:
        return []
    shards = ShardSet(data, "validation", block_size)
    if shards.n_blocks == 0:
        return []
    if data.manifest.rows:
        ids_list = held_out_prompts(shards, cfg.samples)
    else:
        blocks = np.unique(np.linspace(0, shards.n_blocks - 1, cfg.samples).astype(np.int64))
        x, _ = shards.windows(blocks)
        ids_list = [row[:TEXT_PROMPT_TOKENS].tolist() for row in x]
    return [Prompt(tokenizer.decode(ids), tuple(ids)) for ids in ids_list]


def held_out_prompts(shards: ShardSet, n: int) -> list[list[int]]:
    """The prompts of the first `n` held-out examples: each example's tokens before its
    first loss token (system and user turns, and the assistant's opening marker)."""
    out: list[list[int]] = []
    for block in range(shards.n_blocks):
        if len(out) == n:
            break
        row = shards.windows(np.array([block]))  # (inputs, labels, positions)
        tokens, labels, positions = (t[0].tolist() for t in row)
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for a, b in zip(starts, starts[1:], strict=False):
            first = next((i for i in range(a, b) if labels[i] != -100), None)
            if first is not None and len(out) < n:
                out.append(tokens[a:first + 1])  # labels[i] is the target of tokens[i]
    return out


@torch.no_grad()
def complete(forward: Callable[..., Any], prompt: Prompt, max_tokens: int, eos_id: int,
             block_size: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager[Any]], stop_early: bool = True
             ) -> list[int]:
    """Greedy completion of `prompt`: at most `max_tokens` tokens, ending after the
    end-of-text token; the context is the last `block_size` tokens. Without `stop_early`
    every step runs (then the tail is cut): under FSDP each forward pass is a collective,
    and ranks must not part ways on a near-tie that one of them decodes as end-of-text."""
    ids = list(prompt.ids)
    new: list[int] = []
    for _ in range(max_tokens):
        x = torch.tensor([ids[-block_size:]], device=device)
        with autocast():
            logits = forward(input_ids=x, use_cache=False).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        ids.append(token)
        if token == eos_id and stop_early:
            break
    return new[:new.index(eos_id) + 1] if eos_id in new else new


def sample_rows(model: torch.nn.Module, prompts: list[Prompt], step: int, cfg: TrainConfig,
                tokenizer: Any, eos_id: int, block_size: int, device: torch.device,
                autocast: Callable[[], AbstractContextManager[Any]], fsdp: bool = False
                ) -> list[dict[str, Any]]:
    """One evaluation's table rows: (step, prompt, completion) per prompt. `model` is called
    as it is under FSDP (its hooks gather the weights); otherwise through its plain
    `forward`, so a compiled model is not recompiled for every prompt length."""
    was_training = model.training
    model.eval()
    forward = model if fsdp else model.forward
    try:
        rows = []
        for p in prompts:
            new = complete(forward, p, cfg.sample_max_tokens, eos_id, block_size, device,
                           autocast, stop_early=not fsdp)
            rows.append({"step": step, "prompt": p.text,
                         "completion": tokenizer.decode(new, skip_special_tokens=True)})
        return rows
    finally:
        model.train(was_training)


