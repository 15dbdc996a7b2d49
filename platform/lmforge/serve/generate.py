"""Continuously batched, streamed sampling with per-request settings.

`transformers`' `generate()` applies one GenerationConfig (and one RNG) to a whole batch
and runs it to the end; a serving batch mixes requests with their own max_tokens,
temperature, top_p, top_k, seed and stop strings, each must stream its own tokens, leave
the batch when it is done, and a request arriving mid-batch should not wait for the batch
to finish. So `Decoder` is written here: token-level ("continuous") batching as LLM
servers do it (vLLM, TGI; Ray Serve's LLM API delegates it to vLLM, which does not run on
a CPU-only box). Between two decode steps it prefills newly admitted prompts (left-padded
and masked) and merges their KV cache into the running batch; a finished request's row is
dropped from the batch and the cache at once.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream
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


def _sample(logits: torch.Tensor, params: list[GenerationParams],
            gens: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` (rows x vocab, float32 on the CPU), each with its own
    settings, computed for all rows at once; a seeded row draws from its own generator,
    so its tokens do not depend on what it is batched with. Which steps apply is decided
    in Python first: at one row, each tensor op skipped is a few percent of a decode step."""
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if len(rows) < len(params):  # temperature 0: greedy
        out = logits.argmax(-1).tolist()
        if not rows:
            return out
        x = logits[rows]
    else:
        out, x = [0] * len(params), logits
    sampled = [params[i] for i in rows]
    temps = {p.temperature for p in sampled}
    x = x / (temps.pop() if len(temps) == 1 else
             torch.tensor([[p.temperature] for p in sampled]))
    vocab = x.shape[-1]
    if any(0 < p.top_k < vocab for p in sampled):
        # A top_k of the vocabulary or more cuts nothing (0 here), whatever its size.
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else 0 for p in sampled])
        cut = top_k > 0
        kth = torch.topk(x, int(top_k.max()), dim=-1).values
        kth = kth.gather(-1, (top_k.clamp(1, kth.shape[-1]) - 1)[:, None])
        x = x.masked_fill(cut[:, None] & (x < kth), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(p.top_p < 1 for p in sampled):
        top_p = torch.tensor([[p.top_p] for p in sampled])
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (sorted_probs.cumsum(-1) - sorted_probs >= top_p) & (top_p < 1)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0))
    # Inverse-CDF draws: one uniform number per row (from the row's own generator when it
    # is seeded), all rows searched at once; torch.multinomial costs ~1 ms for 32 rows.
    # The draws come after everything a row's settings decide, so when those make this
    # call fail no generator has moved, and sampling each row alone again (Decoder's
    # _advance does) draws what the batch would have.
    if all(gens[i] is None for i in rows):
        u = torch.rand(len(rows), 1)
    else:
        u = torch.empty(len(rows), 1)
        shared = [j for j, i in enumerate(rows) if gens[i] is None]
        if shared:
            u[shared] = torch.rand(len(shared), 1)
        for j, i in enumerate(rows):
            if gens[i] is not None:
                u[j] = torch.rand(1, generator=gens[i])
    cdf = probs.cumsum(-1)
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    for i, tok in zip(rows, picks[:, 0].tolist(), strict=True):
        out[i] = tok
    return out


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
        # `tokenizers`' incremental detokenizer: each token costs O(1), not a re-decode.
        self.detok = DecodeStream(skip_special_tokens=True)

    def add(self, tok: int | None, tokenizer: PreTrainedTokenizerBase) -> Delta:
        """Take one sampled token (None: end of text); return what to emit."""
        p = self.params
        new = [] if tok is None else [tok]
        if tok is not None:
            self.token_ids.append(tok)
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:
                self.text += self.detok.step(backend, tok) or ""
            else:  # a slow (Python) tokenizer: decode everything again
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


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` zero-padded on the left of `dim` to `width`."""
    if t.shape[dim] == width:
        return t
    shape = list(t.shape)
    shape[dim] = width - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Decoder:
    """Rows decoding together, one token per `step`, that requests join and leave between
    steps. Every row's tokens sit right-aligned in the KV cache (`mask` marks them), so two
    batches merge by left-padding the shorter cache, and leading columns no row uses any
    more are trimmed: the cache is never longer than the longest live sequence."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.keys: list[Hashable] = []  # row -> the caller's key for that request
        self.states: list[_Request] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # rows x cache length: 1 = a real token
        self.next_ids: list[int] = []  # each row's last sampled token, not yet in the cache

    def __len__(self) -> int:
        return len(self.keys)

    def clear(self) -> None:
        """Drop every row."""
        self._keep([])

    @torch.inference_mode()
    def step(self, admit: Iterable[tuple[Hashable, GenerationParams]] = (),
             drop: Iterable[Hashable] = ()) -> list[tuple[Hashable, Delta | Exception]]:
        """Drop the rows of `drop` (requests nobody waits for any more), decode one token
        for every running row, then prefill `admit`'s prompts (their first token) and merge
        them in. Returns a Delta per row; a row whose Delta has a finish_reason has left.

        A request that cannot be decoded (its seed, its prompt, its sampling settings)
        gets its exception in place of a Delta and leaves; the other rows go on as if it
        had never been there. Raises only when the running batch's own forward pass
        fails, which no single row is to blame for."""
        gone = set(drop)
        if gone:
            self._keep([r for r, k in enumerate(self.keys) if k not in gone])
        deltas = self._decode() if self.keys else []
        admit = list(admit)
        if admit:
            deltas += self._admit(admit)
        return deltas

    def _admit(self, admit: list[tuple[Hashable, GenerationParams]]
               ) -> list[tuple[Hashable, Delta | Exception]]:
        """Prefill `admit` together and merge the rows still running into the batch. When
        that prefill fails, each request is prefilled alone, so only the one at fault
        fails; nothing is merged before a prefill has succeeded."""
        results: list[tuple[Hashable, Delta | Exception]] = []
        ready: list[tuple[Hashable, _Request]] = []
        for key, params in admit:  # a seed torch refuses fails here, before any model work
            try:
                ready.append((key, _Request(params)))
            except Exception as e:
                results.append((key, e))
        if not ready:
            return results
        try:
            prefilled = [self._prefill(ready)]
        except Exception as e:
            if len(ready) == 1:
                return [*results, (ready[0][0], e)]
            prefilled = []
            for key, state in ready:  # afresh: the failed attempt may have moved a generator
                try:
                    prefilled.append(self._prefill([(key, _Request(state.params))]))
                except Exception as e:
                    results.append((key, e))
        for deltas, join in prefilled:
            results += deltas
            if join is not None:
                self._join(*join)
        return results

    def _decode(self) -> list[tuple[Hashable, Delta | Exception]]:
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = self.model(input_ids=torch.tensor(self.next_ids, device=self.device)[:, None],
                         attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                         cache=self.cache, use_cache=True)
        self.cache, self.mask = out.cache, mask
        deltas, keep, self.next_ids = self._advance(out.logits[:, -1, :], self.keys,
                                                    self.states)
        if len(keep) < len(self):
            self._keep(keep)
        return deltas

    def _prefill(self, rows: list[tuple[Hashable, _Request]]):  # noqa: ANN202
        """Prefill `rows` (their first token) without touching the batch. Returns their
        Deltas and what `_join` takes to merge the rows still running (None: none)."""
        prompts = [state.params.prompt_ids for _, state in rows]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        keys, states = [k for k, _ in rows], [state for _, state in rows]
        deltas, keep, sampled = self._advance(out.logits[:, -1, :], keys, states)
        if not keep:
            return deltas, None
        new = torch.tensor(keep, device=self.device)
        out.cache.batch_select_indices(new)
        return deltas, (out.cache, mask[new], [keys[r] for r in keep],
                        [states[r] for r in keep], [sampled[r] for r in keep])

    def _join(self, cache, mask: torch.Tensor, keys: list[Hashable],  # noqa: ANN001
              states: list[_Request], next_ids: list[int]) -> None:
        """Append prefilled rows to the batch."""
        if self.keys:
            self._merge(cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self.keys += keys
        self.states += states
        self.next_ids += next_ids

    def _advance(self, logits: torch.Tensor, keys: list[Hashable], states: list[_Request]
                 ) -> tuple[list[tuple[Hashable, Delta | Exception]], list[int], list[int]]:
        """Sample each row's next token; return the Deltas (an exception for a row that
        could not be sampled), the rows still running and the sampled tokens."""
        # Sampling runs on the CPU: one transfer per step, and a seeded request draws the
        # same tokens on any device.
        logits = logits.float().cpu()
        params, gens = [s.params for s in states], [s.gen for s in states]
        sampled: list[int | Exception]
        try:
            sampled = list(_sample(logits, params, gens))
        except Exception:  # one row's settings broke the batch: sample each row alone
            sampled = []
            for row in range(len(states)):
                try:
                    sampled += _sample(logits[row:row + 1], params[row:row + 1],
                                       gens[row:row + 1])
                except Exception as e:
                    sampled.append(e)
        deltas: list[tuple[Hashable, Delta | Exception]] = []
        keep = []
        for row, (key, state, tok) in enumerate(zip(keys, states, sampled, strict=True)):
            if isinstance(tok, Exception):
                deltas.append((key, tok))
                continue
            try:
                delta = state.add(None if tok == self.eos else tok, self.tokenizer)
            except Exception as e:
                deltas.append((key, e))
                continue
            deltas.append((key, delta))
            if delta.finish_reason is None:
                keep.append(row)
        return deltas, keep, [t if isinstance(t, int) else self.pad for t in sampled]

    def _keep(self, rows: list[int]) -> None:
        """Keep only `rows`, and trim cache columns no remaining row uses."""
        self.keys = [self.keys[r] for r in rows]
        self.states = [self.states[r] for r in rows]
        self.next_ids = [self.next_ids[r] for r in rows]
        if not rows:
            self.cache = self.mask = None
            return
        idx = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _merge(self, cache, mask: torch.Tensor) -> None:  # noqa: ANN001
        """Append rows (their KV cache and mask) to the batch, left-padding the shorter."""
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2),
                                   _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2),
                                     _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])


def decode_stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  requests: list[GenerationParams]) -> Iterator[list[Delta | None]]:
    """Decode `requests` together, one token per step. Each step yields one entry per
    request: its Delta while it runs (the last one carries `finish_reason`), then None."""
    decoder = Decoder(model, tokenizer)
    admit = list(enumerate(requests))
    while admit or len(decoder):
        step: list[Delta | None] = [None] * len(requests)
        for i, delta in decoder.step(admit):
            if isinstance(delta, Exception):
                raise delta
            step[i] = delta
        admit = []
        yield step


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
