"""Batched sampling with per-request settings.

`transformers`' `generate()` applies one GenerationConfig (and one RNG) to a whole batch;
a serving batch mixes requests with their own max_tokens, temperature, top_p, seed and
stop strings, so this short decode loop is written here. It left-pads prompts, masks the
padding, reuses the KV cache, stops adding tokens to a request once it finishes, and
stops decoding once every request has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationParams:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


def _sample(logits: torch.Tensor, p: GenerationParams, gen: torch.Generator | None) -> int:
    if p.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   requests: list[GenerationParams]) -> list[Generation]:
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    width = max(len(r.prompt_ids) for r in requests)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
                       device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids)
                         for r in requests], device=device)
    gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            for r in requests]
    outs = [Generation(text="") for _ in requests]
    active = list(range(len(requests)))
    cache = None
    step_input = ids
    for _ in range(max(r.max_tokens for r in requests)):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1]:]
        out = model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                    cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1, :]
        next_ids = torch.full((len(requests),), pad, dtype=torch.long, device=device)
        for i in list(active):
            r, o = requests[i], outs[i]
            tok = _sample(logits[i], r, gens[i])
            next_ids[i] = tok
            if tok == eos:
                o.finish_reason = "stop"
                active.remove(i)
                continue
            o.token_ids.append(tok)
            o.text = tokenizer.decode(o.token_ids, skip_special_tokens=True)
            if hit := next((s for s in r.stop if s in o.text), None):
                o.text = o.text[: o.text.index(hit)]
                o.finish_reason = "stop"
                active.remove(i)
            elif len(o.token_ids) >= r.max_tokens:
                active.remove(i)
        if not active:
            break
        step_input = next_ids[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return outs
