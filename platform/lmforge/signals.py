"""Signal handling that cannot deadlock: what a Python signal handler may touch.

A handler runs in the main thread between two bytecodes, and may itself be interrupted by
the next signal. So it must not take a lock: `threading.Event.set` does, and a second
signal landing while the first handler holds that lock runs a nested handler that waits
for it in the same thread, forever. Two signals microseconds apart are ordinary (Ctrl-C
reaches a wrapper such as `timeout` or `make` and its child, and the wrapper forwards it
too); `lmforge serve` hung for good that way (py-spy: `Event.set` inside `Event.set`).
Here a handler only assigns or appends (atomic under the GIL), and waiting polls.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

POLL_S = 0.1
REPEAT_S = 1.0
"""How far apart two SIGTERMs must be to count as two: closer ones are one stop delivered
twice (a `kill` of a process group reaching a wrapper, such as `uv run`, that forwards it to
its child as well)."""


class SignalFlag:
    """`threading.Event`'s `set`/`is_set`/`wait`, safe to set from a signal handler: setting
    is one assignment; `wait` polls every `poll_s` (no lock on either side)."""

    def __init__(self, poll_s: float = POLL_S) -> None:
        self._set = False
        self.poll_s = poll_s

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set and (deadline is None or time.monotonic() < deadline):
            time.sleep(self.poll_s)
        return self._set


class StopRequest(SignalFlag):
    """The flag a graceful stop's SIGTERM handler sets (`handle`): the first signal asks
    for the stop, and the caller's thread waits on it and does the work; a second one, at
    least `repeat_s` later, exits at once with `exit_code` (the user no longer waits for
    the checkpoint). A closer repeat is the same stop delivered twice, and is ignored."""

    def __init__(self, exit_code: int, repeat_s: float = REPEAT_S,
                 poll_s: float = POLL_S) -> None:
        super().__init__(poll_s)
        self.exit_code, self.repeat_s = exit_code, repeat_s
        self._at = 0.0

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler: assignments only, or `sys.exit` (lock-free)."""
        now = time.monotonic()
        if not self._set:
            self._at = now
            self._set = True
        elif now - self._at >= self.repeat_s:
            sys.exit(self.exit_code)


class StopSignals:
    """SIGINT and SIGTERM caught inside `with`, the previous handlers back after it; `wait()`
    blocks until one arrives and returns it. Ctrl-C, `kill`, systemd and Kubernetes all
    mean "stop", so both are handled explicitly (a shell starts background jobs with SIGINT
    ignored). For a long-running command's main thread (`lmforge serve`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def wait(self, poll_s: float = POLL_S) -> int:
        while not self.received:
            time.sleep(poll_s)
        return self.received[0]


__all__ = ["REPEAT_S", "SignalFlag", "StopRequest", "StopSignals"]
