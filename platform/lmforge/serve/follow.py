"""Following `models:/NAME@ALIAS` as the alias moves, for one replica.

Each poll asks the registry where the alias points; when it moved, the new version loads
(off the event loop: loading is blocking work) and replaces the one serving. A version
that fails to load is not tried again at every poll: each failure doubles the wait
before the next try, from the poll interval up to `MAX_RETRY_WAIT_S`, and the current
version serves meanwhile. Were it retried every poll, each try would download another
full copy of the model. A promotion to another version is tried at the next poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("ray.serve")

MAX_RETRY_WAIT_S = 600.0
"""The longest wait between two tries of a version that failed to load."""

Loaded = TypeVar("Loaded")


class AliasFollower(Generic[Loaded]):
    """Polls `resolve(model_uri)` (the version the alias points at now); when that is not
    `pinned`, `load`s it and hands it to `swap(loaded, version)`. `clock` is injectable
    so a test can step through the back-off."""

    def __init__(self, model_uri: str, pinned: str, resolve: Callable[[str], str],
                 load: Callable[[str], Loaded], swap: Callable[[Loaded, str], None],
                 every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.model_uri, self.pinned, self.every_s = model_uri, pinned, every_s
        self._resolve, self._load, self._swap, self._clock = resolve, load, swap, clock
        self._failed: str | None = None  # the version whose last load failed
        self._failures = 0  # how many times in a row it failed
        self._retry_at = 0.0

    def run(self, stop: threading.Event) -> None:
        """Check every `every_s` seconds until `stop` is set."""
        while not stop.wait(self.every_s):
            self.check()

    def check(self) -> None:
        """One poll. Never raises: a registry or load failure must not stop serving."""
        try:
            version = self._resolve(self.model_uri)
        except Exception:  # a registry hiccup: ask again at the next poll
            log.exception("checking %s failed; still serving %s", self.model_uri, self.pinned)
            return
        if version == self.pinned:
            return
        if version == self._failed and self._clock() < self._retry_at:
            return
        log.info("%s moved to %s: loading it", self.model_uri, version)
        try:
            loaded = self._load(version)
        except Exception:
            self._failures = self._failures + 1 if version == self._failed else 1
            self._failed = version
            wait = min(self.every_s * 2 ** (self._failures - 1), MAX_RETRY_WAIT_S)
            self._retry_at = self._clock() + wait
            log.exception("loading %s failed (%d in a row); still serving %s; next try in "
                          "%.0f s", version, self._failures, self.pinned, wait)
            return
        self._swap(loaded, version)
        self.pinned, self._failed, self._failures = version, None, 0
        log.info("now serving %s", version)
