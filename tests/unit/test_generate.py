"""Batched generation with per-request settings, and the OpenAI request schema."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lmforge.data.tokenizer import EOS
from lmforge.serve.generate import Decoder, GenerationParams, decode_stream, generate_batch
from lmforge.serve.schemas import (
    MAX_N,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_TOP_K,
    MIN_SEED,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    error_body,
)

PROMPTS = ["the", "quick brown fox jumps", "a", "def f_1(x):\n    return"]


@pytest.fixture
def gen(tiny_model, char_tok):
    """gen(*requests) -> their Generations, decoded together as one batch."""

    def run(*requests: GenerationParams, model=tiny_model):
        return generate_batch(model, char_tok, list(requests))

    return run


@pytest.fixture
def request_for(char_tok):
    """request_for(prompt, max_tokens=16, **params) -> GenerationParams."""

    def make(prompt: str, max_tokens: int = 16, **params) -> GenerationParams:
        return GenerationParams(prompt_ids=char_tok.encode(prompt, add_special_tokens=False),
                                max_tokens=max_tokens, **params)

    return make


def test_greedy_output_is_the_same_alone_and_in_a_batch(gen, request_for):
    requests = [request_for(p, temperature=0) for p in PROMPTS]
    alone = [gen(r)[0] for r in requests]
    batched = gen(*requests)
    assert len({len(r.prompt_ids) for r in requests}) == len(requests)  # real left padding
    for a, b in zip(alone, batched, strict=True):
        assert b.token_ids == a.token_ids
        assert b.text == a.text
        assert b.finish_reason == a.finish_reason


def test_seeded_sample_is_the_same_alone_and_in_a_batch(gen, request_for):
    seeded = request_for("the", temperature=1.0, seed=11)
    others = [request_for(p, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
    alone = gen(seeded)[0]
    assert gen(others[1], seeded, others[3])[1].token_ids == alone.token_ids


def test_max_tokens_is_respected_per_request(gen, request_for):
    limits = [1, 4, 9, 20]
    outs = gen(*(request_for(p, max_tokens=n, temperature=1.0, seed=0)
                 for p, n in zip(PROMPTS, limits, strict=True)))
    for out, limit in zip(outs, limits, strict=True):
        assert len(out.token_ids) <= limit
        if len(out.token_ids) < limit:
            assert out.finish_reason == "stop"
    greedy = gen(request_for("the", max_tokens=7, temperature=0))[0]
    assert len(greedy.token_ids) == 7 and greedy.finish_reason == "length"


def test_same_seed_same_text_different_seeds_differ(gen, request_for):
    def sample(seed: int) -> list[int]:
        return gen(request_for("the", max_tokens=24, temperature=1.0, seed=seed))[0].token_ids

    assert sample(5) == sample(5)
    assert len({tuple(sample(seed)) for seed in range(6)}) > 1


def test_temperature_zero_ignores_the_seed(gen, request_for):
    a = gen(request_for("quick", temperature=0, seed=1))[0]
    b = gen(request_for("quick", temperature=0, seed=2))[0]
    assert a.token_ids == b.token_ids


def test_tiny_top_p_keeps_only_the_most_likely_token(gen, request_for):
    greedy = gen(request_for("quick", temperature=0))[0]
    for seed in range(3):
        nucleus = gen(request_for("quick", temperature=1.0, top_p=1e-6, seed=seed))[0]
        assert nucleus.token_ids == greedy.token_ids


def test_stop_sequence_truncates_the_text(gen, request_for):
    full = gen(request_for("quick brown", max_tokens=30, temperature=0))[0].text
    stop = full[4:6]
    cut = full.index(stop)
    out = gen(request_for("quick brown", max_tokens=30, temperature=0, stop=(stop,)))[0]
    assert out.text == full[:cut]
    assert stop not in out.text
    assert out.finish_reason == "stop"
    assert len(out.token_ids) == cut + len(stop) < 30  # decoding stopped at the hit


class ForceEos(torch.nn.Module):
    """Wraps a model so that its `at_call`-th forward pass makes eos the only choice."""

    def __init__(self, inner: torch.nn.Module, eos: int, at_call: int) -> None:
        super().__init__()
        self.inner, self.eos, self.at_call, self.calls = inner, eos, at_call, 0

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        self.calls += 1
        if self.calls == self.at_call:
            out.logits[:, -1, self.eos] = 1e4
        return out


def test_eos_ends_a_request_without_appearing_in_it(gen, request_for, tiny_model, char_tok):
    model = ForceEos(tiny_model, char_tok.eos_token_id, at_call=4)
    out = gen(request_for("the", max_tokens=10, temperature=0), model=model)[0]
    assert len(out.token_ids) == 3
    assert char_tok.eos_token_id not in out.token_ids
    assert EOS not in out.text
    assert out.finish_reason == "stop"


class CountRows(torch.nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, **kwargs):
        self.rows.append(kwargs["input_ids"].shape[0])
        return self.inner(**kwargs)


def test_a_finished_request_leaves_the_batch_at_once(tiny_model, char_tok, request_for):
    model = CountRows(tiny_model)
    requests = [request_for("the", max_tokens=2, temperature=0),
                request_for("quick", max_tokens=5, temperature=0),
                request_for("a", max_tokens=9, temperature=0)]
    steps = list(decode_stream(model, char_tok, requests))
    # Its last delta (with finish_reason) comes on its own last step, then None.
    assert [s[0].finish_reason if s[0] else None for s in steps[:3]] == [None, "length", None]
    assert steps[2][0] is None and steps[5][1] is None
    assert model.rows == [3, 3, 2, 2, 2, 1, 1, 1, 1]  # finished rows are dropped
    assert len(steps) == 9
    alone = [generate_batch(tiny_model, char_tok, [r])[0].token_ids for r in requests]
    batched = generate_batch(tiny_model, char_tok, requests)
    assert [b.token_ids for b in batched] == alone  # pruning the cache changes nothing


def test_streamed_text_never_shows_part_of_a_stop_sequence(gen, request_for, tiny_model,
                                                           char_tok):
    full = gen(request_for("quick brown", max_tokens=30, temperature=0))[0].text
    stop = full[6:9]
    req = request_for("quick brown", max_tokens=30, temperature=0, stop=(stop, "zzzz"))
    shown = ""
    for step in decode_stream(tiny_model, char_tok, [req]):
        shown += step[0].text
        assert stop not in shown and not shown.endswith(stop[:2])  # held back until decided
    assert shown == full[: full.index(stop)]


def test_a_top_k_over_the_vocabulary_is_no_cut_even_beside_a_small_one(gen, request_for):
    plain = gen(request_for("the", temperature=1.0, seed=3))[0]
    small = request_for("a", temperature=1.0, top_k=2, seed=4)
    for huge in (10**4, MAX_TOP_K, 2**64):  # the char vocabulary has ~50 tokens
        out = gen(request_for("the", temperature=1.0, top_k=huge, seed=3), small)
        assert out[0].token_ids == plain.token_ids
        assert out[1].token_ids == gen(small)[0].token_ids


def test_top_k_one_is_greedy_and_top_k_limits_choices(gen, request_for):
    greedy = gen(request_for("the", temperature=0))[0]
    for seed in range(3):
        assert gen(request_for("the", temperature=1.5, top_k=1, seed=seed))[0].token_ids == \
            greedy.token_ids
    wide = {tuple(gen(request_for("the", max_tokens=1, temperature=2.0, seed=s))[0].token_ids)
            for s in range(40)}
    narrow = {tuple(gen(request_for("the", max_tokens=1, temperature=2.0, top_k=2,
                                    seed=s))[0].token_ids) for s in range(40)}
    assert len(narrow) <= 2 < len(wide)


# --- request schema ------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", -1), ("max_tokens", 0), ("temperature", 3), ("temperature", -0.1),
    ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 9), ("stream", "yes"), ("prompt", ""),
    ("top_k", -1), ("top_k", MAX_TOP_K + 1), ("top_k", 2**64),
    ("seed", MAX_SEED + 1), ("seed", MIN_SEED - 1), ("seed", 2**64),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("best_of", 2),
    ("stop", "x" * (MAX_STOP_CHARS + 1)),
    # JSON's "\ud800" decodes to a lone surrogate, which no tokenizer can take.
    ("prompt", "\ud800"), ("prompt", "ok \udfff"), ("stop", ["\n", "\ud800"]),
    ("stop", "\udc00"), ("user", "\ud800"), ("model", "m\ud800"),
])
def test_completion_request_rejects_bad_field(field, value):
    body = {"prompt": "hello", field: value}
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    assert [e["loc"][0] for e in info.value.errors()] == [field]


def test_chat_message_text_must_be_valid_unicode():
    for message in ({"role": "user", "content": "hi \ud800"},
                    {"role": "user", "content": "hi", "name": "\udc00"}):
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate({"messages": [message]})
        assert info.value.errors()[0]["loc"][:2] == ("messages", 0)
    ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "é 😀"}]})


def test_every_seed_accepted_is_one_torch_takes_for_each_of_n_choices():
    for seed in (MIN_SEED, MAX_SEED):
        req = CompletionRequest.model_validate({"prompt": "hi", "seed": seed, "n": MAX_N})
        for i in range(req.n):  # choice i samples with seed + i
            torch.Generator().manual_seed(req.seed + i)


def test_completion_request_defaults_and_stop_list():
    req = CompletionRequest.model_validate({"prompt": "hi", "stop": "\n"})
    assert req.stop == ["\n"]
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.n, req.stream) == (
        16, 1.0, 1.0, 0, 1, False)
    assert CompletionRequest(prompt="hi").stop is None


def test_completion_response_and_error_shapes():
    body = {"model": "m", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    first, second = (CompletionResponse.model_validate(body) for _ in range(2))
    assert first.id.startswith("cmpl-") and first.id != second.id
    assert first.object == "text_completion"
    assert error_body("bad", "max_tokens") == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "max_tokens", "code": None}}


# --- continuous batching ---------------------------------------------------------------


def test_a_request_joining_mid_batch_decodes_as_if_alone(tiny_model, char_tok, request_for):
    """Rows admitted between steps (longer and shorter prompts than the running ones) get
    the tokens they get alone, and so do the rows they joined."""
    first = [request_for("quick brown", max_tokens=12, temperature=0),
             request_for("a", max_tokens=20, temperature=0, seed=3)]
    late = [request_for("def f_1(x):\n    return", max_tokens=6, temperature=0),
            request_for("the", max_tokens=9, temperature=1.0, seed=7)]
    alone = {i: generate_batch(tiny_model, char_tok, [r])[0].token_ids
             for i, r in enumerate(first + late)}
    decoder = Decoder(tiny_model, char_tok)
    got: dict[int, list[int]] = {i: [] for i in alone}
    for step in range(40):
        admit = list(enumerate(first)) if step == 0 else (
            [(2 + i, r) for i, r in enumerate(late)] if step == 3 else [])
        for key, delta in decoder.step(admit):
            got[key] += delta.token_ids
        if step > 3 and not len(decoder):
            break
    assert got == alone
    assert decoder.mask is None and decoder.cache is None  # everything left


def test_the_cache_is_trimmed_to_the_longest_live_row(tiny_model, char_tok, request_for):
    decoder = Decoder(tiny_model, char_tok)
    decoder.step([("long", request_for("def f_1(x):\n    return", max_tokens=3, temperature=0)),
                  ("short", request_for("a", max_tokens=10, temperature=0))])
    while "long" in decoder.keys:
        decoder.step()
    # Only "a" and its first two tokens are in the cache (the third goes in at the next
    # step): the long prompt's columns are gone.
    assert decoder.mask.shape[1] == 1 + 2 and bool(decoder.mask.all())
    assert decoder.cache.layers[0].keys.shape[-2] == decoder.mask.shape[1]


def test_dropped_rows_leave_without_a_delta(tiny_model, char_tok, request_for):
    decoder = Decoder(tiny_model, char_tok)
    decoder.step([("a", request_for("the", temperature=0)),
                  ("b", request_for("quick", temperature=0))])
    deltas = decoder.step(drop={"a"})
    assert [k for k, _ in deltas] == ["b"] and decoder.keys == ["b"]


def test_sampling_follows_the_distribution_after_top_p_and_top_k():
    from lmforge.serve.generate import _sample

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).repeat(4000, 1)

    def freq(**settings) -> list[float]:
        params = [GenerationParams(prompt_ids=[0], max_tokens=1, **settings)] * len(logits)
        gens = [torch.Generator().manual_seed(i) if "seed" in settings else None
                for i in range(len(logits))]
        counts = torch.bincount(torch.tensor(_sample(logits, params, gens)), minlength=5)
        return (counts / len(logits)).tolist()

    assert freq(temperature=1.0) == pytest.approx([0.5, 0.3, 0.15, 0.05, 0], abs=0.03)
    assert freq(temperature=1.0, seed=0) == pytest.approx([0.5, 0.3, 0.15, 0.05, 0], abs=0.03)
    # top_p 0.7 keeps {0.5, 0.3}; top_k 2 the same two; both renormalised.
    for cut in ({"top_p": 0.7}, {"top_k": 2}):
        assert freq(temperature=1.0, **cut) == pytest.approx([0.625, 0.375, 0, 0, 0], abs=0.03)
    assert freq(temperature=0) == [1, 0, 0, 0, 0]
