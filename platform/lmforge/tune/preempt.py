"""SIGTERM to a search's driver ends the search with a checkpoint in every running trial.

A Ray Jobs stop, a pod deletion or a spot notice sends SIGTERM to the driver (`lmforge
tune`, or `run` with a search). Without this, Python's default action ends the driver at
once: its trials' actors die with it, each losing the steps since its last checkpoint,
and their MLflow runs stay RUNNING. With it:

1. `SearchStop`, a Tune callback, puts a SIGTERM handler in the driver's main thread when
   the search starts, and again at every step of Tune's loop (Ray's C++ core was seen to
   put its own fatal-signal handler over ours: `lmforge.train.preempt`). The handler only
   sets an event; a second SIGTERM (a second or more later) exits at once.
2. A thread then sets the search's `StopFlag` (`lmforge.train.preempt`), which every
   trial's workers watch: each running trial saves a checkpoint at its next step
   boundary, its MLflow run becomes KILLED, it tells the flag, and it waits
   (`trial.train_driver_fn`).
3. Once every trial that was running has told it (or `grace_s` has passed), the thread
   sends the driver SIGUSR1: Ray Tune's own graceful stop, which saves the experiment's
   state with those trials still RUNNING (what `Tuner.restore(resume_unfinished=True)`
   starts again, continuing each Train run from its checkpoint) and ends their actors.
   `run_search` then raises `Preempted`: the parent run is KILLED and the CLI exits 143.

Tune pickles its callbacks into tuner.pkl and `Tuner.restore` brings them back, so the
callback holds only the search's name: `lend(name, flag)` gives it the flag of the driver
that is running the search now, a new one after `--resume`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray import tune

from lmforge.signals import StopRequest
from lmforge.train.preempt import EXIT_CODE, STOP_GRACE_S, StopFlag

_FLAGS: dict[str, Any] = {}
"""Search name -> the StopFlag of the search this process runs now (see `lend`)."""


@contextlib.contextmanager
def lend(name: str) -> Iterator[Any]:
    """A new StopFlag for search `name`, for the block: passed to its trials as a
    parameter, and found by the search's `SearchStop` (a restored one too) under `name`.
    Process-local on purpose: a signal handler is the process's own."""
    flag = StopFlag.remote()
    _FLAGS[name] = flag
    try:
        yield flag
    finally:
        _FLAGS.pop(name, None)
        ray.kill(flag)


class SearchStop(tune.Callback):
    """Turns SIGTERM to the driver into a checkpoint in every running trial and a saved,
    resumable search (see the module doc). Inert outside the main thread, where Python
    cannot handle signals, and when no flag is lent under its name."""

    def __init__(self, name: str, grace_s: float = STOP_GRACE_S) -> None:
        self.name, self.grace_s = name, grace_s
        self._fresh()

    def _fresh(self) -> None:
        self._flag: Any = None
        # Set by SIGTERM (`_handle`, lock-free: lmforge.signals); a second one exits.
        self._requested = StopRequest(EXIT_CODE)
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._previous: Any = None

    def __getstate__(self) -> dict[str, Any]:  # into tuner.pkl: no handle, no thread state
        return {"name": self.name, "grace_s": self.grace_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    # --- Tune's loop (the driver's main thread) -----------------------------------------

    def setup(self, **info: Any) -> None:
        self._flag = _FLAGS.get(self.name)
        if self._flag is None or threading.current_thread() is not threading.main_thread():
            self._flag = None
            return
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handle)
        threading.Thread(target=self._forward, name="lmforge-search-stop", daemon=True).start()

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._flag is None:
            return
        signal.signal(signal.SIGTERM, self._handle)  # ours again if Ray replaced it
        with self._lock:
            self._running = {t.trial_id for t in trials if t.status == "RUNNING"}

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._flag is not None and self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self._requested.handle(signum, frame)  # _forward says so: a handler may not print

    # --- the thread that waits for the trials ------------------------------------------

    def _forward(self) -> None:
        self._requested.wait()
        print("[lmforge] SIGTERM: every running trial saves a checkpoint at its next step "
              "boundary, then the search's state is saved and it stops (a second SIGTERM "
              "exits at once)", file=sys.__stderr__, flush=True)
        flag = self._flag
        with self._lock:
            waiting = set(self._running)
        deadline = time.monotonic() + self.grace_s
        with contextlib.suppress(Exception):  # the search has ended meanwhile
            ray.get(flag.request.remote(), timeout=60)
            while time.monotonic() < deadline:
                stopped = ray.get(flag.stopped_at.remote(), timeout=60)
                with self._lock:  # a trial that finished or failed meanwhile is not waited for
                    left = (waiting & self._running) - stopped.keys()
                if not left:
                    break
                time.sleep(0.25)  # polling the trials' progress, bounded by grace_s
            else:
                print(f"[lmforge] {len(left)} trial(s) did not checkpoint within "
                      f"{self.grace_s:.0f} s; saving the search's state without them",
                      file=sys.__stderr__, flush=True)
        # Ray Tune's graceful stop (its handler, installed in the main thread by
        # `tune.run`): it saves the experiment's state, then ends the trials' actors.
        os.kill(os.getpid(), signal.SIGUSR1)


def requested(flag: Any) -> dict[str, int] | None:
    """After the search: None when no SIGTERM stopped it, else the trials that saved a
    checkpoint and the step each stopped after."""
    if not ray.get(flag.requested.remote(), timeout=60):
        return None
    return ray.get(flag.stopped_at.remote(), timeout=60)


__all__ = ["SearchStop", "lend", "requested"]
