"""A replica's decode loop: continuous batching in one thread, results on asyncio.

`Engine.submit(streams)` queues requests. A decode thread steps a `Decoder` per model
version back to back and, between two steps, admits waiting requests while rows are free:
a request never waits for another batch to finish. Results reach the event loop once per
step (one `call_soon_threadsafe` for all rows), and only for streams that show tokens as
they come or have finished; a non-streaming request gets one Delta with all its text.
The event loop meanwhile keeps answering health checks and taking requests.

Ray Serve's `@serve.batch` runs a batch to its end (or several whole batches side by side,
competing for the same cores); token-level batching is left to engines such as vLLM,
which needs a GPU. So this loop is ours.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass

from lmforge.registry import LoadedModel
from lmforge.serve.generate import Decoder, Delta, GenerationParams

log = logging.getLogger("ray.serve")


class Stream:
    """One sequence to decode for the model version it was tokenized for. Iterate it for
    its Deltas (the last one has a finish_reason): one per token when `live`, else one."""

    def __init__(self, loaded: LoadedModel, params: GenerationParams, live: bool = True) -> None:
        self.loaded, self.params, self.live = loaded, params, live
        self.cancelled = False
        self.cancelled_at_step: int | None = None  # the engine's step count at cancel()
        self.engine: Engine | None = None  # set by Engine.submit
        self.first_token_at: float | None = None  # perf_counter() of its first token
        self._held: Delta | None = None  # decode thread only: what is not delivered yet
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    def cancel(self) -> None:
        """Nobody waits for the rest: the engine drops the row before its next step."""
        if not self.cancelled and self.engine is not None:
            self.cancelled_at_step = self.engine.stats.steps
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return

    def _add(self, delta: Delta) -> Delta | None:
        """(decode thread) Take one step's Delta; return what to deliver now, if anything."""
        if delta.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self._held is not None:
            delta = Delta(self._held.text + delta.text, self._held.token_ids + delta.token_ids,
                          delta.finish_reason)
            self._held = None
        if self.live or delta.finish_reason:
            return delta
        self._held = delta
        return None


async def run(stream: Stream, admit: Callable[[Stream], Awaitable[object]]
              ) -> AsyncIterator[Delta]:
    """Admit `stream` (`admit` hands it to an Engine) and yield its Deltas. However this
    ends (finished, failed, or the caller cancelled at any await, admission included) the
    stream is cancelled, so a request nobody waits for any more never takes a row, or
    leaves it at the next step: cancelled after the hand-over but before `admit`
    returned, it would otherwise decode to its end for nobody."""
    try:
        await admit(stream)
        async for delta in stream:
            yield delta
    finally:
        stream.cancel()


@dataclass
class EngineStats:
    """What a replica's decode loop has done since it started (counters, written by the
    decode thread only), so that a test or an operator can see rows come and go."""

    steps: int = 0
    """Decode steps run (every model version's batch counts once per round)."""
    admitted: int = 0
    """Rows that joined a batch."""
    finished: int = 0
    """Rows that ended with a finish_reason (stop, length)."""
    failed: int = 0
    """Rows that ended with an error."""
    dropped: int = 0
    """Rows taken out of a batch because nobody waited for them any more (a client gone)."""
    skipped: int = 0
    """Requests cancelled before they got a row: never decoded."""
    max_drop_lag_steps: int = 0
    """Most steps any dropped row started after its cancel() and before it left the batch:
    1 when a row always leaves at the next step (the step running at cancel finishes)."""
    tokens: int = 0
    """Tokens generated, all rows."""


class Engine:
    """Decodes every submitted Stream, at most `max_rows` rows at a time."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.stats = EngineStats()
        self._waiting: deque[Stream] = deque()  # appended by the loop, popped by the thread
        # One Decoder per model version: after an alias switch the old one drains while
        # new requests start on the new one.
        self._decoders: dict[int, Decoder] = {}
        self._wake = threading.Event()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None  # perf_counter() while a step runs

    @property
    def running(self) -> int:
        return sum(map(len, list(self._decoders.values())))

    def submit(self, streams: list[Stream]) -> None:
        """(event loop) Queue `streams`; their Deltas arrive on this loop."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="lmforge-decode",
                                            daemon=True)
            self._thread.start()
        for stream in streams:
            stream.engine = self
        self._waiting.extend(streams)
        self._wake.set()

    def stats_dict(self) -> dict[str, int]:
        """(any thread) A snapshot of `stats`, plus the rows decoding and waiting now."""
        return asdict(self.stats) | {"running": self.running, "waiting": len(self._waiting)}

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def health(self, stall_s: float) -> str | None:
        """(any thread) Why this engine cannot serve, or None: its thread died, or the step
        running now started more than `stall_s` seconds ago."""
        if self._thread is not None and not self._thread.is_alive() and not self._closed:
            return "the decode thread has died"
        started = self._step_started
        if started is not None and (took := time.perf_counter() - started) > stall_s:
            return f"a decode step has run for {took:.0f} s (stall limit {stall_s:g} s)"
        return None

    # --- the decode thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            if not self._waiting and not self.running:
                self._wake.wait()
                self._wake.clear()
                continue
            self._step_started = time.perf_counter()
            try:
                admit = self._admit()
                for key, decoder in list(self._decoders.items()):
                    self._step(decoder, admit.get(key, []))
                    if not len(decoder):
                        del self._decoders[key]
            except Exception as e:  # a bug here must not leave requests waiting forever
                log.exception("decode loop failed")
                waiting = [self._waiting.popleft() for _ in range(len(self._waiting))]
                self._deliver([(s, e) for d in self._decoders.values() for s in d.keys]
                              + [(s, e) for s in waiting])
                self._decoders.clear()
            self._step_started = None

    def _admit(self) -> dict[int, list[Stream]]:
        """Waiting streams that get a row now, in arrival order, by model version."""
        admit: dict[int, list[Stream]] = {}
        free = self.max_rows - self.running
        while self._waiting and free > 0:
            stream = self._waiting.popleft()
            if stream.cancelled:
                self.stats.skipped += 1
                continue
            key = id(stream.loaded)
            if key not in self._decoders:
                self._decoders[key] = Decoder(stream.loaded.model, stream.loaded.tokenizer)
            admit.setdefault(key, []).append(stream)
            free -= 1
        return admit

    def _step(self, decoder: Decoder, admit: list[Stream]) -> None:
        stats = self.stats
        drop = [s for s in decoder.keys if s.cancelled]
        stats.steps += 1
        stats.admitted += len(admit)
        stats.dropped += len(drop)
        for s in drop:  # this step is the first without the row: lag counts it
            if s.cancelled_at_step is not None:
                lag = stats.steps - s.cancelled_at_step
                stats.max_drop_lag_steps = max(stats.max_drop_lag_steps, lag)
        try:
            deltas = decoder.step([(s, s.params) for s in admit], drop)
        except Exception as e:  # the batch's forward pass failed: no row is to blame, so
            # this batch fails (and is reset); the engine goes on
            log.exception("decode step failed")
            failed = [*decoder.keys, *admit]
            stats.failed += len(failed)
            self._deliver([(s, e) for s in failed])
            decoder.clear()
            return
        ready: list[tuple[Stream, Delta | BaseException]] = []
        for stream, delta in deltas:
            if isinstance(delta, Exception):  # this request alone could not be decoded
                log.error("request failed: %r", delta, exc_info=delta)
                stats.failed += 1
                ready.append((stream, delta))
                continue
            stats.tokens += len(delta.token_ids)
            stats.finished += bool(delta.finish_reason)
            if (due := stream._add(delta)) is not None:
                ready.append((stream, due))
        self._deliver(ready)

    def _deliver(self, items: list[tuple[Stream, Delta | BaseException]]) -> None:
        if items and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Stream, Delta | BaseException]]) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)
