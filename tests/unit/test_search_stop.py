"""`SearchStop` (lmforge.tune.preempt) outside a running search: what Tune pickles into
tuner.pkl, and that it leaves SIGTERM alone when it has no flag to set. The SIGTERM path
itself runs in tests/chaos/test_chaos_tune.py (real Ray, a real `lmforge tune`)."""

from __future__ import annotations

import pickle
import signal
import threading

from lmforge.tune.preempt import SearchStop


def test_pickles_to_its_name_and_grace_only():
    """tuner.pkl keeps the search's name: a restored callback finds the flag the resuming
    driver lends under it, never a handle of the driver that was stopped."""
    stop = SearchStop("my-search", grace_s=5)
    stop._flag = object()  # what setup() holds while a search runs
    stop._requested.set()
    back = pickle.loads(pickle.dumps(stop))
    assert (back.name, back.grace_s) == ("my-search", 5)
    assert back._flag is None and not back._requested.is_set()


def test_without_a_lent_flag_sigterm_is_left_alone():
    before = signal.getsignal(signal.SIGTERM)
    stop = SearchStop("nobody-lent-this")
    stop.setup()
    stop.on_step_begin(0, [])
    assert signal.getsignal(signal.SIGTERM) is before
    stop.on_experiment_end([])
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_it_is_inert(monkeypatch):
    """Python handles signals only in the main thread: a search run from another thread
    (a test's) keeps the default SIGTERM."""
    from lmforge.tune import preempt

    monkeypatch.setitem(preempt._FLAGS, "s", object())
    before = signal.getsignal(signal.SIGTERM)
    stop = SearchStop("s")
    worker = threading.Thread(target=stop.setup)
    worker.start()
    worker.join()
    assert stop._flag is None and signal.getsignal(signal.SIGTERM) is before
