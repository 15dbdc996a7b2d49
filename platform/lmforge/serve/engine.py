"""A replica's decode loop: continuous batching on asyncio, no Ray needed.

`Engine.submit(streams)` queues requests; one background task steps a `Decoder` per model
version in a worker thread (so the event loop keeps answering health checks and taking
requests), and between two steps admits waiting requests while rows are free. A request
never waits for another batch to finish, and each `Stream` gets its Deltas as they come.

Ray Serve's `@serve.batch` runs a batch to its end (or several whole batches side by side,
competing for the same cores); token-level batching is left to engines such as vLLM,
which needs a GPU. So this loop is ours.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator

from lmforge.registry import LoadedModel
from lmforge.serve.generate import Decoder, Delta, GenerationParams

log = logging.getLogger("ray.serve")


class Stream:
    """One sequence to decode for the model version it was tokenized for; iterate it for
    its Deltas (the last one has a finish_reason)."""

    def __init__(self, loaded: LoadedModel, params: GenerationParams) -> None:
        self.loaded, self.params = loaded, params
        self.cancelled = False
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    def cancel(self) -> None:
        """Nobody waits for the rest: the engine drops the row before its next step."""
        self.cancelled = True

    def put(self, item: Delta | BaseException) -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return


class Engine:
    """Decodes every submitted Stream, at most `max_rows` rows at a time."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._waiting: deque[Stream] = deque()
        # One Decoder per model version: after an alias switch the old one drains while
        # new requests start on the new one.
        self._decoders: dict[int, Decoder] = {}
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> int:
        return sum(map(len, self._decoders.values()))

    def submit(self, streams: list[Stream]) -> None:
        self._waiting.extend(streams)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        try:
            while self._waiting or self.running:
                admit = self._admit()
                for key, decoder in list(self._decoders.items()):
                    await self._step(decoder, admit.get(key, []))
                    if not len(decoder):
                        del self._decoders[key]
        except BaseException as e:  # a bug here must not leave requests waiting forever
            if not isinstance(e, asyncio.CancelledError):  # cancelled: the replica stops
                log.exception("decode loop failed")
            for decoder in self._decoders.values():
                for stream in decoder.keys:
                    stream.put(e)
            while self._waiting:
                self._waiting.popleft().put(e)
            self._decoders.clear()
            raise
        finally:
            self._task = None

    def _admit(self) -> dict[int, list[Stream]]:
        """Waiting streams that get a row now, in arrival order, by model version."""
        admit: dict[int, list[Stream]] = {}
        free = self.max_rows - self.running
        while self._waiting and free > 0:
            stream = self._waiting.popleft()
            if stream.cancelled:
                continue
            key = id(stream.loaded)
            if key not in self._decoders:
                self._decoders[key] = Decoder(stream.loaded.model, stream.loaded.tokenizer)
            admit.setdefault(key, []).append(stream)
            free -= 1
        return admit

    async def _step(self, decoder: Decoder, admit: list[Stream]) -> None:
        drop = [s for s in decoder.keys if s.cancelled]
        try:
            deltas = await asyncio.to_thread(decoder.step, [(s, s.params) for s in admit], drop)
        except Exception as e:  # this batch fails (and is reset); the engine goes on
            log.exception("decode step failed")
            for stream in [*decoder.keys, *admit]:
                stream.put(e)
            decoder.clear()
            return
        for stream, delta in deltas:
            stream.put(delta)
