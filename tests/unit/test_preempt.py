"""Preemption without Ray: the check every rank runs at each step boundary (two real gloo
ranks, one of which sees the stop flag late: both stop after the same step, within two
steps of the flag, and the check costs microseconds a step), and the driver's SIGTERM
handling (it survives another handler taking over, and gives `fit`'s error back)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.signals import StopRequest
from lmforge.train.preempt import EXIT_CODE, Preemption, StopCheck


def _rank(rank: int, world: int, store: str, seen_at: dict[int, int], out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    seen = threading.Event()  # what `watch` sets when the driver's flag is
    check = StopCheck(seen)
    stopped_at, start = None, time.perf_counter()
    for step in range(1, 1001):
        if step == seen_at[rank]:
            seen.set()  # the SIGTERM reached this rank's worker now
        if check.should_stop():
            stopped_at = step
            break
    check.close()
    out[rank] = (stopped_at, (time.perf_counter() - start) / step)
    dist.destroy_process_group()


def test_every_rank_stops_after_the_same_step(tmp_path: Path):
    seen_at = {0: 500, 1: 503}  # the flag reaches rank 1 three steps later than rank 0
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(2, str(tmp_path / "store"), seen_at, out), nprocs=2)
        results = dict(out)
    (stop0, per_step0), (stop1, per_step1) = results[0], results[1]
    assert stop0 == stop1  # every rank reports and checkpoints alike
    assert 501 <= stop0 <= 502  # one or two boundaries after the first rank saw it
    assert max(per_step0, per_step1) < 0.005  # an async all-reduce of one int per step


def test_one_rank_reads_its_flag_directly():
    seen = threading.Event()
    check = StopCheck(seen)  # no process group: a 1-worker run
    assert not check.should_stop()
    seen.set()
    assert check.should_stop()


class NoRay(Preemption):
    """The driver's side without Ray: records that the workers would have been told."""

    def __init__(self) -> None:
        self.requested = StopRequest(EXIT_CODE)
        self.told = threading.Event()

    def _tell_workers(self) -> None:
        self.told.set()


def test_sigterm_during_fit_asks_the_workers_even_after_another_handler_took_over():
    preemption = NoRay()
    before = signal.getsignal(signal.SIGTERM)
    libc = ctypes.CDLL(None)

    def fit() -> str:
        # What Ray's C++ core does when some part of it starts: its own handler for
        # SIGTERM (here: ignore it, so that a lost race fails the test, not the process).
        libc.signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN, behind Python's back
        time.sleep(0.5)  # > the 0.2 s in which the driver puts its handler back
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.told.wait(5), "the workers were not told"
        return "checkpointed"

    assert preemption.run(fit) == "checkpointed"
    assert preemption.requested.is_set()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_an_error_in_fit_is_raised_in_the_caller():
    def fit() -> None:
        raise ValueError("worker group failed")

    with pytest.raises(ValueError, match="worker group failed"):
        NoRay().run(fit)
