"""The last intact copy of a search's Tune state: taken only when every file is whole, put
back by `repair` when a killed driver left one cut short, refused clearly when none exists;
on a local disk and in an object store (a real moto S3 server)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest

from lmforge.runs import ResumeError
from lmforge.tune import snapshot as snapshots
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


class Where:
    """An experiment directory in a pyarrow filesystem, with what the tests do to files."""

    def __init__(self, fs: pyarrow.fs.FileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def __truediv__(self, name: str) -> str:
        return f"{self.path}/{name}"

    def write(self, name: str, data: bytes | str) -> None:
        with self.fs.open_output_stream(self / name) as f:
            f.write(data.encode() if isinstance(data, str) else data)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def files(self, path: str | None = None) -> dict[str, bytes]:
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(path or self.path))
        return {i.base_name: self.read(i.path) for i in infos
                if i.type == pyarrow.fs.FileType.File}

    def dirs(self, path: str) -> list[str]:
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory]

    def cut_short(self, name: str) -> None:
        data = self.read(self / name)
        self.write(name, data[: len(data) // 2])

    def tune_dir(self, trials: int = 1) -> Where:
        """Files shaped as Ray Tune leaves them in an experiment directory."""
        self.write(STATE, json.dumps({"trial_data": [["t"] * 2] * trials}))
        self.write(SEARCHER, pickle.dumps({"trials": list(range(trials))}))
        self.write("search_gen_state-2026-11-26_10-00-00.json", pickle.dumps({"n": 1}))
        self.write("tuner.pkl", pickle.dumps({"trainable": "fn"}))
        self.write("lmforge_search.json", "{}")  # ours, not Tune's: not in a snapshot
        return self


@pytest.fixture(params=["local", "s3"])
def exp(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "local":
        (tmp_path / "search").mkdir()
        return Where(pyarrow.fs.LocalFileSystem(), str(tmp_path / "search"))
    server = request.getfixturevalue("s3_server")
    return Where(server.fs(), f"{server.bucket().removeprefix('s3://')}/search")


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


def test_snapshot_then_repair_puts_the_cut_file_back(exp: Where):
    exp.tune_dir()
    before = exp.files()
    assert take_snapshot(exp.fs, exp.path)
    snapshot = latest_snapshot(exp.fs, exp.path)
    assert snapshot is not None
    assert sorted(exp.files(snapshot)) == sorted(n for n in before if n != "lmforge_search.json")

    exp.cut_short(STATE)
    assert repair(exp.fs, exp.path) == [STATE]
    assert exp.files() == before
    # Nothing is lost: the damaged set is kept aside.
    (aside,) = [d for d in exp.dirs(exp / SNAPSHOT_DIR) if "damaged-" in d]
    assert exp.read(f"{aside}/{STATE}") == before[STATE][: len(before[STATE]) // 2]
    assert repair(exp.fs, exp.path) == []  # whole again
    # The search goes on and snapshots again: older snapshots go, the damaged set stays.
    exp.write(STATE, json.dumps({"trial_data": []}))
    assert take_snapshot(exp.fs, exp.path)
    assert latest_snapshot(exp.fs, exp.path) != snapshot
    assert not exp.exists(snapshot) and exp.exists(aside)


def test_repair_drops_files_newer_than_the_snapshot(exp: Where):
    exp.tune_dir()
    assert take_snapshot(exp.fs, exp.path)
    newer = "experiment_state-2026-11-26_11-00-00.json"  # a resumed session's
    exp.write(newer, '{"trial_da')
    assert repair(exp.fs, exp.path) == [newer]
    assert not exp.exists(exp / newer)
    (aside,) = [d for d in exp.dirs(exp / SNAPSHOT_DIR) if "damaged-" in d]
    assert exp.read(f"{aside}/{newer}") == b'{"trial_da'


def test_a_snapshot_is_never_taken_of_a_file_being_written(exp: Where):
    exp.tune_dir(trials=1)
    assert take_snapshot(exp.fs, exp.path)
    good = latest_snapshot(exp.fs, exp.path)
    exp.tune_dir(trials=2)
    exp.cut_short(SEARCHER)  # Tune (or its syncer) is mid-write
    assert not take_snapshot(exp.fs, exp.path)
    assert latest_snapshot(exp.fs, exp.path) == good
    assert json.loads(exp.read(f"{good}/{STATE}"))["trial_data"] == [["t", "t"]]


def test_repair_without_a_snapshot_says_what_is_damaged(exp: Where):
    exp.tune_dir()
    exp.write(STATE, b"")
    with pytest.raises(ResumeError, match=rf"{STATE} cut short.*tracking.run_name"):
        repair(exp.fs, exp.path)
    assert exp.exists(exp / STATE)  # left as it was


def test_callback_snapshots_each_new_state_once(exp: Where, monkeypatch):
    monkeypatch.setattr(snapshots, "REMOTE_EVERY_S", 0.0)  # every step, here
    exp.tune_dir()
    trial = SimpleNamespace(storage=SimpleNamespace(storage_filesystem=exp.fs,
                                                    experiment_fs_path=exp.path))
    callback = StateSnapshots()
    callback.on_step_end(iteration=0, trials=[])  # no trial yet: nothing to look at
    assert latest_snapshot(exp.fs, exp.path) is None
    callback.on_step_end(iteration=1, trials=[trial])
    first = latest_snapshot(exp.fs, exp.path)
    callback.on_step_end(iteration=2, trials=[trial])
    assert latest_snapshot(exp.fs, exp.path) == first  # unchanged files: no second copy

    exp.tune_dir(trials=3)  # a new state: another size, whatever the clock's resolution
    callback.on_step_end(iteration=3, trials=[trial])
    second = latest_snapshot(exp.fs, exp.path)
    assert second != first and not exp.exists(first)  # only the newest set is kept
    assert json.loads(exp.read(f"{second}/{STATE}"))["trial_data"] == [["t", "t"]] * 3

    # Tune pickles its callbacks into tuner.pkl; a restored one starts afresh.
    assert pickle.loads(pickle.dumps(callback))._seen is None


def test_remote_state_is_listed_every_remote_every_s(s3_server, monkeypatch):
    exp = Where(s3_server.fs(), f"{s3_server.bucket().removeprefix('s3://')}/search")
    exp.tune_dir()
    trial = SimpleNamespace(storage=SimpleNamespace(storage_filesystem=exp.fs,
                                                    experiment_fs_path=exp.path))
    listed = []
    real = snapshots._state_infos
    monkeypatch.setattr(snapshots, "_state_infos", lambda fs, p: listed.append(p) or real(fs, p))
    monkeypatch.setattr(snapshots, "REMOTE_EVERY_S", 3600.0)
    callback = StateSnapshots()
    callback.on_step_end(iteration=0, trials=[trial])
    assert latest_snapshot(exp.fs, exp.path) is not None
    looked = len(listed)
    for step in range(1, 5):
        callback.on_step_end(iteration=step, trials=[trial])
    assert len(listed) == looked  # not a listing of the bucket per turn of Tune's loop
