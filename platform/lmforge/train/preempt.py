"""Preemption: SIGTERM to a training driver ends the run with a checkpoint, not a loss.

A Ray Jobs stop, a Kubernetes pod deletion and a spot node's notice all send SIGTERM to
the driver (`lmforge train|run`), not to the Ray Train workers, which may be on other
nodes. So the signal travels in three hops, each cheap on the step loop's hot path:

1. driver: `Preemption.run(fit)` handles SIGTERM while training runs; the handler only
   sets a flag (no Ray calls, no lock, no print: `lmforge.signals`), and a thread passes it
   on to `StopFlag`, a zero-CPU actor that lives as long as the run. `fit` runs in a
   thread of its own, so that the main thread, where Python runs signal handlers, is free
   to run ours at once and to put it back every 0.2 s: Ray's C++ core installs its own
   fatal-signal handler (which aborts the process on SIGTERM) when some of its parts
   start, and that was seen to happen after ours was installed;
2. every worker: a thread blocks on the actor's `wait()` and sets a local event, so a
   step boundary reads a flag instead of making a remote call;
3. the ranks agree on the step to stop at: each boundary starts an all-reduce (MAX) of
   the local flags on a CPU (gloo) group and reads the result of the previous boundary's.
   Every rank then stops after the same step, one or two steps after the signal reached
   it, without a sync point on the GPU stream and without waiting for the reduce.

At that boundary the workers save a checkpoint (no evaluation: the grace period is short)
and report it with `preempted` set, and return; Ray Train ends the run normally, and the
driver raises `Preempted` for the pipeline to mark the MLflow run KILLED and the CLI to
exit 143 (128 + SIGTERM). `lmforge train SPEC --resume` continues from that checkpoint.
A second SIGTERM (a second or more after the first: closer ones are the same stop
delivered twice) does not wait for the checkpoint: the driver exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from lmforge.signals import StopRequest

T = TypeVar("T")

EXIT_CODE = 128 + signal.SIGTERM
"""What a preempted `lmforge train|run` exits with: the shell's code for "ended by
SIGTERM", which Ray Jobs, Kubernetes and systemd read as stopped rather than crashed."""

STOP_GRACE_S = 120.0
"""How long a search's driver waits after SIGTERM for its running trials to checkpoint
before it saves the search's state without them (`lmforge.tune.preempt`). A trial needs
its next step boundary, a checkpoint write and a report (Ray Train passes reports on at its
controller's poll, every 2 s by default); one whose workers are still starting needs them
to start first. A training driver needs seconds. Whatever sends SIGTERM should wait at
least this long before a SIGKILL: `lmforge submit` sets Ray Jobs' wait (`jobs.STOP_WAIT_S`)."""


class Preempted(RuntimeError):
    """The run (or a search: `lmforge.tune.preempt`) stopped on SIGTERM after saving a
    checkpoint at `step`; `--resume` goes on from there."""

    def __init__(self, step: int, message: str | None = None) -> None:
        super().__init__(message or f"stopped by SIGTERM after step {step}, with a "
                         "checkpoint there: the same command with --resume continues from it")
        self.step = step


@ray.remote(num_cpus=0)
class StopFlag:
    """Set once by the driver; workers wait on it. In a search, each trial that has saved
    its checkpoint says so (`stopped`), so the driver knows when it may end the search."""

    def __init__(self) -> None:
        self._set = asyncio.Event()
        self._stopped: dict[str, int] = {}

    async def request(self) -> None:
        self._set.set()

    async def requested(self) -> bool:
        return self._set.is_set()

    async def wait(self) -> bool:
        await self._set.wait()
        return True

    async def stopped(self, who: str, step: int) -> None:
        self._stopped[who] = step

    async def stopped_at(self) -> dict[str, int]:
        """Who has checkpointed and stopped, and after which step."""
        return dict(self._stopped)


class Preemption:
    """The driver's side: a `StopFlag` for the workers, set by SIGTERM during `run`."""

    def __init__(self) -> None:
        self.flag = StopFlag.remote()
        # Set by SIGTERM (`handle`, lock-free: lmforge.signals); a second one exits.
        self.requested = StopRequest(EXIT_CODE)

    def run(self, fit: Callable[[], T]) -> T:
        """`fit()`, with SIGTERM asking the workers to checkpoint and stop meanwhile (the
        previous handler comes back after it). Outside the main thread (a test's thread,
        a Tune trial) signals cannot be handled: there it is just `fit()`."""
        if threading.current_thread() is not threading.main_thread():
            return fit()
        previous = signal.getsignal(signal.SIGTERM)
        handler = self.requested.handle  # forward says so: a handler may not print

        def forward() -> None:
            self.requested.wait()
            print("[lmforge] SIGTERM: saving a checkpoint at the next step boundary, then "
                  "stopping (a second SIGTERM exits at once)", file=sys.__stderr__, flush=True)
            with contextlib.suppress(Exception):  # the run has ended meanwhile
                self._tell_workers()

        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = fit()
            except BaseException as e:  # raised again in the main thread
                outcome["error"] = e

        threading.Thread(target=forward, name="lmforge-preempt", daemon=True).start()
        # Daemon: a driver that exits (a second SIGTERM, Ctrl-C) does not wait for it.
        fitting = threading.Thread(target=target, name="lmforge-fit", daemon=True)
        fitting.start()
        try:
            while fitting.is_alive():
                signal.signal(signal.SIGTERM, handler)  # ours again if Ray replaced it
                fitting.join(0.2)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _tell_workers(self) -> None:
        ray.get(self.flag.request.remote(), timeout=60)

    def close(self) -> None:
        ray.kill(self.flag)


def watch(flag: Any) -> threading.Event:
    """An event set once `flag` (a StopFlag handle) is: a thread blocks on the actor, so a
    step boundary reads a local flag instead of making a remote call."""
    seen = threading.Event()

    def wait() -> None:
        with contextlib.suppress(Exception):  # the actor is gone: the run has ended
            if ray.get(flag.wait.remote()):
                seen.set()

    threading.Thread(target=wait, name="lmforge-stop-watch", daemon=True).start()
    return seen


class StopCheck:
    """A worker's side: `should_stop()` at every step boundary, on every rank, answers
    the same on all of them (see the module doc). `seen`: this rank's local flag
    (`watch(flag)`)."""

    def __init__(self, seen: threading.Event) -> None:
        import torch
        import torch.distributed as dist

        self._dist = dist
        self._seen = seen
        self._work: Any = None
        self._flags = torch.zeros(1, dtype=torch.int32)
        distributed = dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1
        # Its own CPU group, so neither NCCL's stream nor the gradient all-reduces of the
        # default group are touched (a collective every rank joins: called on all ranks).
        self._group = dist.new_group(backend="gloo") if distributed else None
        self._distributed = distributed

    def should_stop(self) -> bool:
        if not self._distributed:
            return self._seen.is_set()
        if self._work is not None:
            self._work.wait()  # started a step ago: normally long done
            self._work = None
            if self._flags.item():
                return True
        self._flags.fill_(int(self._seen.is_set()))
        self._work = self._dist.all_reduce(self._flags, op=self._dist.ReduceOp.MAX,
                                           group=self._group, async_op=True)
        return False

    def close(self) -> None:
        """Wait for the last all-reduce (every rank started it, so it completes)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
