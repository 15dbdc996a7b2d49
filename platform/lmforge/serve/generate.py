"""Batched, streamed sampling with per-request settings.

`transformers`' `generate()` applies one GenerationConfig (and one RNG) to a whole batch;
a serving batch mixes requests with their own max_tokens, temperature, top_p, top_k, seed
and stop strings, and each must stream its own tokens and leave the batch when it is done.
So this short decode loop is written here. It left-pads prompts, masks the padding, reuses
the KV cache, and drops a finished request's row from the batch (and from the cache) at
once, so the rest decode with less work and the finished one can be answered right away.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationParams:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    """What one decode step added to one request: text safe to show (never part of a stop
    sequence, never half a UTF-8 character), and `finish_reason` on the request's last."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


def _sample(logits: torch.Tensor, p: GenerationParams, gen: torch.Generator | None) -> int:
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters may still turn into a stop sequence or a UTF-8
    character (the tokenizer shows an incomplete byte sequence as U+FFFD)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class _Request:
    """Decoding state of one request: its tokens, full text, and how much was emitted."""

    def __init__(self, params: GenerationParams) -> None:
        self.params = params
        self.gen = (torch.Generator().manual_seed(params.seed)
                    if params.seed is not None else None)
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def add(self, tok: int | None, tokenizer: PreTrainedTokenizerBase) -> Delta:
        """Take one sampled token (None: end of text); return what to emit."""
        p = self.params
        new = [] if tok is None else [tok]
        if tok is not None:
            self.token_ids.append(tok)
            self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        finish = "stop" if tok is None else None
        hit = min((i for s in p.stop if (i := self.text.find(s)) >= 0), default=-1)
        if hit >= 0:  # the earliest stop sequence ends the text, and is not part of it
            self.text, finish = self.text[:hit], "stop"
        elif finish is None and len(self.token_ids) >= p.max_tokens:
            finish = "length"
        end = len(self.text) if finish else len(self.text) - _held_back(self.text, p.stop)
        end = max(end, self.emitted)
        delta = Delta(self.text[self.emitted:end], new, finish)
        self.emitted = end
        return delta


@torch.inference_mode()
def decode_stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  requests: list[GenerationParams]) -> Iterator[list[Delta | None]]:
    """Decode `requests` together, one token per step. Each step yields one entry per
    request: its Delta while it runs (the last one carries `finish_reason`), then None."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
                       device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids)
                         for r in requests], device=device)
    states = [_Request(r) for r in requests]
    rows = list(range(len(requests)))  # row of the batch tensors -> request index
    cache = None
    step_input = ids
    while rows:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1]:]
        out = model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                    cache=cache, use_cache=True)
        cache = out.cache
        # Sampling runs on the CPU: one transfer per step (`int()` would sync per row
        # anyway), and a seeded request draws the same tokens on any device.
        logits = out.logits[:, -1, :].float().cpu()
        step: list[Delta | None] = [None] * len(requests)
        keep, next_ids = [], []
        for row, i in enumerate(rows):
            s = states[i]
            tok = _sample(logits[row], s.params, s.gen)
            step[i] = s.add(None if tok == eos else tok, tokenizer)
            if step[i].finish_reason is None:
                keep.append(row)
                next_ids.append(tok)
        yield step
        if len(keep) < len(rows):
            # A finished request leaves the batch: drop its row from the inputs and cache.
            if not keep:
                break
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask = mask[idx]
            rows = [rows[r] for r in keep]
        step_input = torch.tensor(next_ids, device=device)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   requests: list[GenerationParams]) -> list[Generation]:
    """Decode `requests` together to the end; one Generation per request."""
    outs = [Generation(text="") for _ in requests]
    for step in decode_stream(model, tokenizer, requests):
        for out, delta in zip(outs, step, strict=True):
            if delta is not None:
                out.text += delta.text
                out.token_ids += delta.token_ids
                out.finish_reason = delta.finish_reason or out.finish_reason
    return outs
