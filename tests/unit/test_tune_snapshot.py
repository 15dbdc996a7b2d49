"""The last intact copy of a search's Tune state: taken only when every file is whole, put
back by `repair` when a killed driver left one cut short, refused clearly when none exists."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.runs import ResumeError
from lmforge.tune.snapshot import (
    SNAPSHOT_DIR,
    StateSnapshots,
    intact,
    latest_snapshot,
    repair,
    take_snapshot,
)

STATE = "experiment_state-2026-11-26_10-00-00.json"
SEARCHER = "searcher-state-2026-11-26_10-00-00.pkl"


def tune_dir(path: Path, trials: int = 1) -> Path:
    """Files shaped as Ray Tune leaves them in an experiment directory."""
    path.mkdir(exist_ok=True)
    (path / STATE).write_text(json.dumps({"trial_data": [["t"] * 2] * trials}))
    (path / SEARCHER).write_bytes(pickle.dumps({"trials": list(range(trials))}))
    (path / "search_gen_state-2026-11-26_10-00-00.json").write_bytes(pickle.dumps({"n": 1}))
    (path / "tuner.pkl").write_bytes(pickle.dumps({"trainable": "fn"}))
    (path / "lmforge_search.json").write_text("{}")  # ours, not Tune's: not in a snapshot
    return path


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_intact_tells_whole_files_from_cut_ones(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    whole_json, whole_pickle = b'{"a": [1, 2]}', pickle.dumps({"a": [1, 2]})
    assert intact(whole_json) and intact(whole_pickle)
    assert not intact(whole_json[:-1]) and not intact(whole_pickle[:-1])
    assert not intact(b"")  # what the CI kill left: an empty experiment_state
    # Checking a file reads its opcodes and never runs what it would build.
    assert intact(pickle.dumps(_RunsCode()))
    assert not (tmp_path / "pwned").exists()


def test_snapshot_then_repair_puts_the_cut_file_back(tmp_path: Path):
    exp = tune_dir(tmp_path / "search")
    before = {f.name: f.read_bytes() for f in exp.iterdir() if f.is_file()}
    assert take_snapshot(exp)
    snapshot = latest_snapshot(exp)
    assert snapshot is not None
    assert sorted(f.name for f in snapshot.iterdir()) == sorted(
        n for n in before if n != "lmforge_search.json")

    cut_short(exp / STATE)
    assert repair(exp) == [STATE]
    assert {f.name: f.read_bytes() for f in exp.iterdir() if f.is_file()} == before
    # Nothing is lost: the damaged set is kept aside.
    (aside,) = (exp / SNAPSHOT_DIR).glob("damaged-*")
    assert (aside / STATE).read_bytes() == before[STATE][: len(before[STATE]) // 2]
    assert repair(exp) == []  # whole again
    # The search goes on and snapshots again: older snapshots go, the damaged set stays.
    (exp / STATE).write_text(json.dumps({"trial_data": []}))
    assert take_snapshot(exp) and latest_snapshot(exp) != snapshot
    assert not snapshot.exists() and aside.exists()


def test_repair_drops_files_newer_than_the_snapshot(tmp_path: Path):
    exp = tune_dir(tmp_path / "search")
    assert take_snapshot(exp)
    newer = exp / "experiment_state-2026-11-26_11-00-00.json"  # a resumed session's
    newer.write_text('{"trial_da')
    assert repair(exp) == [newer.name]
    assert not newer.exists()
    (aside,) = (exp / SNAPSHOT_DIR).glob("damaged-*")
    assert (aside / newer.name).read_text() == '{"trial_da'


def test_a_snapshot_is_never_taken_of_a_file_being_written(tmp_path: Path):
    exp = tune_dir(tmp_path / "search", trials=1)
    assert take_snapshot(exp)
    good = latest_snapshot(exp)
    tune_dir(exp, trials=2)
    cut_short(exp / SEARCHER)  # Tune (or its syncer) is mid-write
    assert not take_snapshot(exp)
    assert latest_snapshot(exp) == good
    assert json.loads((good / STATE).read_text())["trial_data"] == [["t", "t"]]


def test_repair_without_a_snapshot_says_what_is_damaged(tmp_path: Path):
    exp = tune_dir(tmp_path / "search")
    (exp / STATE).write_bytes(b"")
    with pytest.raises(ResumeError, match=rf"{STATE} cut short.*tracking.run_name"):
        repair(exp)
    assert (exp / STATE).exists()  # left as it was


def test_callback_snapshots_each_new_state_once(tmp_path: Path):
    exp = tune_dir(tmp_path / "search")
    trial = SimpleNamespace(storage=SimpleNamespace(experiment_fs_path=str(exp)))
    callback = StateSnapshots()
    callback.on_step_end(iteration=0, trials=[])  # no trial yet: nothing to look at
    assert latest_snapshot(exp) is None
    callback.on_step_end(iteration=1, trials=[trial])
    first = latest_snapshot(exp)
    callback.on_step_end(iteration=2, trials=[trial])
    assert latest_snapshot(exp) == first  # unchanged files: no second copy

    tune_dir(exp, trials=3)
    os.utime(exp / STATE, ns=(1, 1))  # a new state, whatever the clock's resolution
    callback.on_step_end(iteration=3, trials=[trial])
    second = latest_snapshot(exp)
    assert second != first and not first.exists()  # only the newest set is kept
    assert json.loads((second / STATE).read_text())["trial_data"] == [["t", "t"]] * 3

    # Tune pickles its callbacks into tuner.pkl; a restored one starts afresh.
    assert pickle.loads(pickle.dumps(callback))._seen is None
