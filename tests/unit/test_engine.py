"""The replica's decode loop (continuous batching on asyncio), without Ray."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from lmforge.registry import LoadedModel
from lmforge.serve.engine import Engine, Stream
from lmforge.serve.generate import GenerationParams, generate_batch


@pytest.fixture
def loaded(tiny_model, char_tok) -> LoadedModel:
    return LoadedModel(tiny_model, char_tok, "tiny")


def params(tok, prompt: str, max_tokens: int = 12) -> GenerationParams:
    return GenerationParams(prompt_ids=tok.encode(prompt, add_special_tokens=False),
                            max_tokens=max_tokens, temperature=0)


async def collect(stream: Stream) -> list[int]:
    return [t async for delta in stream for t in delta.token_ids]


def test_requests_arriving_while_others_decode_join_and_match_decoding_alone(loaded):
    prompts = ["quick brown", "a", "def f_1(x):\n    return", "the"]
    requests = [params(loaded.tokenizer, p, max_tokens=6 + 3 * i) for i, p in enumerate(prompts)]
    alone = [generate_batch(loaded.model, loaded.tokenizer, [r])[0].token_ids for r in requests]

    async def main() -> list[list[int]]:
        engine = Engine(max_rows=3)  # the 4th waits for a free row
        streams = [Stream(loaded, r) for r in requests]
        engine.submit(streams[:2])
        first = asyncio.create_task(collect(streams[0]))
        await asyncio.sleep(0)  # let the loop start decoding before the others arrive
        engine.submit(streams[2:])
        try:
            return [await first, *[await collect(s) for s in streams[1:]]]
        finally:
            engine.close()

    assert asyncio.run(main()) == alone


def test_a_cancelled_stream_leaves_and_the_others_finish(loaded):
    async def main() -> tuple[int, list[int]]:
        engine = Engine(max_rows=4)
        gone, kept = (Stream(loaded, params(loaded.tokenizer, p, 30)) for p in ("the", "a"))
        engine.submit([gone, kept])
        async for _ in gone:  # one token, then the client goes away
            gone.cancel()
            break
        tokens = await collect(kept)
        engine.close()
        return engine, tokens

    engine, tokens = asyncio.run(main())
    assert engine.running == 0 and len(tokens) == 30
    stats = engine.stats_dict()
    # The gone row left at the first step after its cancel(): it did not decode on.
    assert stats["dropped"] == 1 and stats["max_drop_lag_steps"] == 1
    assert stats["admitted"] == 2 and stats["finished"] == 1 and stats["failed"] == 0
    assert stats["tokens"] > 30 and stats["running"] == stats["waiting"] == 0


class Broken(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        raise RuntimeError("model exploded")


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(loaded):
    broken = LoadedModel(Broken(loaded.model), loaded.tokenizer, "broken")

    async def main() -> list[int]:
        engine = Engine(max_rows=4)
        bad = Stream(broken, params(loaded.tokenizer, "the"))
        engine.submit([bad])
        with pytest.raises(RuntimeError, match="model exploded"):
            await collect(bad)
        good = Stream(loaded, params(loaded.tokenizer, "the", 5))
        engine.submit([good])
        tokens = await collect(good)
        engine.close()
        return tokens

    assert len(asyncio.run(main())) == 5


def test_a_stream_that_is_not_live_gets_one_delta_with_everything(loaded):
    request = params(loaded.tokenizer, "quick", 9)
    whole = generate_batch(loaded.model, loaded.tokenizer, [request])[0]

    async def main() -> tuple[list, Stream]:
        engine = Engine(max_rows=2)
        quiet = Stream(loaded, request, live=False)
        engine.submit([quiet, Stream(loaded, params(loaded.tokenizer, "a", 3))])
        deltas = [d async for d in quiet]
        engine.close()
        return deltas, quiet

    deltas, quiet = asyncio.run(main())
    assert len(deltas) == 1 and deltas[0].token_ids == whole.token_ids
    assert deltas[0].text == whole.text and deltas[0].finish_reason == whole.finish_reason
    assert quiet.first_token_at is not None


class Stuck(torch.nn.Module):
    """A model whose forward blocks until released: a hung decode step."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.release = inner, threading.Event()

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        self.release.wait()
        return self.inner(**kwargs)


def test_health_reports_a_stalled_step_and_recovers_when_it_ends(loaded):
    stuck = Stuck(loaded.model)

    async def main() -> tuple[str | None, str | None, str | None, list[int]]:
        engine = Engine(max_rows=2)
        idle = engine.health(stall_s=0.05)
        stream = Stream(LoadedModel(stuck, loaded.tokenizer, "stuck"),
                        params(loaded.tokenizer, "the", 3))
        engine.submit([stream])
        while engine._step_started is None:  # the decode thread is inside the step
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.1)
        stalled = engine.health(stall_s=0.05)
        patient = engine.health(stall_s=60)
        stuck.release.set()
        tokens = await collect(stream)
        engine.close()
        return idle, stalled, patient, tokens

    idle, stalled, patient, tokens = asyncio.run(main())
    assert idle is None and patient is None and len(tokens) == 3
    assert stalled is not None and "decode step has run for" in stalled


def test_health_reports_a_dead_decode_thread(loaded, monkeypatch):
    async def main() -> str | None:
        engine = Engine(max_rows=2)
        monkeypatch.setattr(engine, "_admit", lambda: (_ for _ in ()).throw(SystemExit()))
        engine.submit([Stream(loaded, params(loaded.tokenizer, "the", 3))])
        engine._thread.join(5)  # SystemExit is not an Exception: the loop cannot catch it
        return engine.health(stall_s=60)

    assert asyncio.run(main()) == "the decode thread has died"


# --- one request cannot hurt another ----------------------------------------------------


def outcomes(loaded: LoadedModel, requests: list[GenerationParams], max_rows: int = 8
             ) -> list[list[int] | Exception]:
    """Decode `requests` submitted together; each one's tokens, or the error it got."""

    async def one(stream: Stream) -> list[int] | Exception:
        try:
            return await collect(stream)
        except Exception as e:
            return e

    async def main() -> list[list[int] | Exception]:
        engine = Engine(max_rows=max_rows)
        streams = [Stream(loaded, r) for r in requests]
        engine.submit(streams)
        try:
            return await asyncio.gather(*(one(s) for s in streams))
        finally:
            engine.close()

    return asyncio.run(main())


def sampled(tok, prompt: str, seed: int, max_tokens: int = 20, **settings) -> GenerationParams:
    return GenerationParams(prompt_ids=tok.encode(prompt, add_special_tokens=False),
                            max_tokens=max_tokens, temperature=1.0, seed=seed, **settings)


def test_a_request_that_cannot_be_admitted_fails_alone(loaded):
    """A seed torch refuses and a prompt the model cannot embed, admitted together with
    good requests: those two fail, the others get the tokens they get without them."""
    tok = loaded.tokenizer
    good = [sampled(tok, "the", 1), sampled(tok, "quick brown", 2),
            params(tok, "a", max_tokens=15)]
    bad_seed = sampled(tok, "the", 2**70)
    bad_prompt = GenerationParams(prompt_ids=[10**6], max_tokens=5)
    clean = outcomes(loaded, good)
    assert all(isinstance(t, list) and t for t in clean)
    got = outcomes(loaded, [good[0], bad_seed, good[1], bad_prompt, good[2]])
    assert isinstance(got[1], (ValueError, RuntimeError)) and isinstance(got[3], IndexError)
    assert [got[0], got[2], got[4]] == clean


def test_a_request_whose_sampling_fails_mid_decode_fails_alone(loaded, monkeypatch):
    """A row whose sampling raises at its third token leaves with that error; the rows
    it was batched with (sampled one by one that step) finish as without it."""
    from lmforge.serve import generate

    tok = loaded.tokenizer
    poison_seed, samplings, real = 666, [], generate._sample

    def sample(logits, params, gens):  # noqa: ANN001, ANN202
        if any(p.seed == poison_seed for p in params):
            samplings.append(len(params))
            if len(samplings) >= 3:
                raise RuntimeError("this row cannot be sampled")
        return real(logits, params, gens)

    good = [sampled(tok, "the", 1), sampled(tok, "quick brown", 2, top_k=3),
            params(tok, "a", max_tokens=15)]
    clean = outcomes(loaded, good)
    monkeypatch.setattr(generate, "_sample", sample)
    got = outcomes(loaded, [*good[:2], sampled(tok, "fox", poison_seed), good[2]])
    assert isinstance(got[2], RuntimeError) and samplings[:3] == [4, 4, 4]
    assert [got[0], got[1], got[3]] == clean


def test_a_top_k_larger_than_the_vocabulary_cuts_nothing_beside_a_small_one(loaded):
    tok = loaded.tokenizer
    huge, small = sampled(tok, "the", 5, top_k=2**70), sampled(tok, "quick", 6, top_k=2)
    got = outcomes(loaded, [huge, small])
    assert got[0] == outcomes(loaded, [sampled(tok, "the", 5)])[0]
    assert got[1] == outcomes(loaded, [small])[0]


def test_a_request_cancelled_while_queued_never_starts_decoding(loaded):
    """Its caller cancelled while it waits in the engine's queue (every row taken), or
    during its admission (after the hand-over, before the caller resumed): either way
    its prompt never reaches the model."""
    from lmforge.serve.engine import run

    seen = CountPrompts(loaded.model)
    counted = LoadedModel(seen, loaded.tokenizer, "counted")
    tok = loaded.tokenizer

    async def main() -> tuple[Stream, Stream, list[int]]:
        engine = Engine(max_rows=1)
        busy = Stream(counted, params(tok, "the", 25))
        queued, handed = (Stream(counted, params(tok, p, 5)) for p in ("quick", "brown fox"))
        engine.submit([busy])

        async def admit(stream: Stream) -> None:
            engine.submit([stream])
            if stream is handed:
                await asyncio.sleep(3600)  # cancelled here, after the hand-over

        async def consume(stream: Stream) -> None:
            async for _ in run(stream, admit):
                pass

        tasks = [asyncio.create_task(consume(s)) for s in (queued, handed)]
        await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        tokens = await collect(busy)
        while engine._waiting or engine.running:
            await asyncio.sleep(0.01)
        engine.close()
        return queued, handed, tokens

    queued, handed, tokens = asyncio.run(main())
    assert len(tokens) == 25
    assert queued.first_token_at is None and handed.first_token_at is None
    assert seen.widths == {len("the"), 1}  # only the busy prompt was prefilled
    stats = queued.engine.stats_dict()
    assert stats["skipped"] == 2 and stats["admitted"] == 1 and stats["dropped"] == 0


class CountPrompts(torch.nn.Module):
    """Records the width of every forward pass (a prefill's is its longest prompt)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.widths = inner, set()

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        self.widths.add(kwargs["input_ids"].shape[1])
        return self.inner(**kwargs)
