"""A last intact copy of a search's Ray Tune state, so a driver killed mid-write resumes.

Ray Tune 2.60 writes its experiment state in place: `TuneController.save_to_dir` opens
`experiment_state-*.json` with "w" and dumps into it, and the syncer then copies the
staging directory into the experiment directory file by file. A driver killed during
either write leaves a truncated file, and `Tuner.restore` then logs "Failed to restore
the run state" and starts the experiment over with no search space (OptunaSearch raises).
Tune has no option for atomic writes, so this is ours:

- `StateSnapshots`, a Tune callback, copies the state files into `.lmforge-state/<n>/`
  each time Tune's copies change and every one of them is whole; `LATEST` names the
  newest complete set and is replaced atomically, so a kill during our copy loses nothing.
- `repair(path)`, before `Tuner.restore`, puts that set back when any of Tune's files is
  damaged (moving the damaged ones aside, not deleting them), or refuses with a clear
  error when there is no intact set to go back to.

A restored snapshot is the state of a moment before the kill: trials that finished after
it run again from their latest Train checkpoint, which is what a kill at that moment gives.

Both work through the experiment's pyarrow filesystem, so `tune.storage_path` in an object
store is covered too. There Tune writes a local copy in place and uploads it, and an upload
still running when Tune rewrites the copy puts a cut file in the bucket; each of our puts
is whole, and `LATEST` is put last. Listing a bucket every turn of Tune's loop would be a
request a second: remote state is looked at every `REMOTE_EVERY_S` seconds.
"""

from __future__ import annotations

import json
import pickletools
import sys
import time
from fnmatch import fnmatch
from typing import Any

import pyarrow.fs
from ray import tune

from lmforge.runs import ResumeError

SNAPSHOT_DIR = ".lmforge-state"
REMOTE_EVERY_S = 10.0
_PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
             "tuner.pkl", "callback-states-*.pkl")

FS = pyarrow.fs.FileSystem


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def _state_infos(fs: FS, path: str) -> list[pyarrow.fs.FileInfo]:
    listing = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted((i for i in listing if i.type == pyarrow.fs.FileType.File
                   and any(fnmatch(i.base_name, p) for p in _PATTERNS)),
                  key=lambda i: i.base_name)


def state_files(fs: FS, path: str) -> list[str]:
    """The names of Tune's files that `Tuner.restore` reads, in the experiment directory
    `path` of `fs`: one listing of it."""
    return [i.base_name for i in _state_infos(fs, path)]


def _read(fs: FS, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write_atomic(fs: FS, path: str, data: bytes) -> None:
    """Whole or not at all: a rename on a disk; in an object store a put is whole, and the
    move a server-side copy of a whole object."""
    parent, name = path.rsplit("/", 1)
    tmp = _join(parent, f".{name}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def intact(data: bytes) -> bool:
    """Whether a state file is whole: JSON that parses, or a pickle whose opcodes run to
    STOP. `pickletools` reads the opcodes without building any object, so checking a file
    never runs code from it."""
    if data[:1] == b"{":
        try:
            json.loads(data)
        except ValueError:
            return False
        return True
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception:  # truncated or garbled: "pickle exhausted before seeing STOP", ...
        return False
    return bool(data)


def _subdirs(fs: FS, path: str) -> list[str]:
    listing = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [i.base_name for i in listing if i.type == pyarrow.fs.FileType.Directory]


def latest_snapshot(fs: FS, path: str) -> str | None:
    """The newest complete snapshot of experiment directory `path`, if there is one."""
    root = _join(path, SNAPSHOT_DIR)
    try:
        name = _read(fs, _join(root, "LATEST")).decode().strip()
    except FileNotFoundError:
        return None
    return _join(root, name) if name and name in _subdirs(fs, root) else None


def take_snapshot(fs: FS, path: str) -> bool:
    """Copy Tune's state files of `path` into a new snapshot if each one is whole (Tune may
    be writing one right now: then try again later). Returns whether it took one."""
    contents = {name: _read(fs, _join(path, name)) for name in state_files(fs, path)}
    if not contents or not all(intact(data) for data in contents.values()):
        return False
    root = _join(path, SNAPSHOT_DIR)
    name = str(time.time_ns())
    fs.create_dir(_join(root, name))
    for file, data in contents.items():  # the bytes checked above, not a second read
        with fs.open_output_stream(_join(root, name, file)) as f:
            f.write(data)
    _write_atomic(fs, _join(root, "LATEST"), name.encode())
    for old in _subdirs(fs, root):  # older snapshots; a damaged set put aside stays
        if old.isdigit() and old != name:
            fs.delete_dir(_join(root, old))
    return True


def repair(fs: FS, path: str) -> list[str]:
    """Before `Tuner.restore`: if any of Tune's state files in `path` is damaged, move the
    current set into `.lmforge-state/damaged-<time>/` and put the latest snapshot back.
    Returns the damaged files' names ([] when all were whole)."""
    files = state_files(fs, path)
    damaged = [name for name in files if not intact(_read(fs, _join(path, name)))]
    if not damaged:
        return []
    snapshot = latest_snapshot(fs, path)
    if snapshot is None:
        raise ResumeError(
            f"{path}: Ray Tune's state of this search is damaged ({', '.join(damaged)} cut "
            "short, as when the driver is killed while writing it) and no intact copy was "
            "kept (it was killed before the first one). Start the search again under "
            "another tracking.run_name")
    aside = _join(path, SNAPSHOT_DIR, f"damaged-{time.time_ns()}")
    fs.create_dir(aside)
    for name in files:
        fs.copy_file(_join(path, name), _join(aside, name))
    # File by file atomically, so a kill during the repair leaves each file whole or still
    # damaged, and the next --resume repairs again.
    restored = {i.base_name: _read(fs, i.path) for i in fs.get_file_info(
        pyarrow.fs.FileSelector(snapshot)) if i.type == pyarrow.fs.FileType.File}
    for name, data in restored.items():
        _write_atomic(fs, _join(path, name), data)
    for name in files:
        if name not in restored:  # newer than the snapshot; its copy is aside
            fs.delete_file(_join(path, name))
    return damaged


class StateSnapshots(tune.Callback):
    """Takes a snapshot whenever Tune's state files in the experiment directory change.

    Called after every step of Tune's loop; a step costs one listing of the directory
    (every `REMOTE_EVERY_S` in an object store) unless Tune has saved a new state since the
    last snapshot."""

    def __init__(self) -> None:
        self._seen: Any = None
        self._next = 0.0

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not trials:
            return
        storage = trials[0].storage
        fs = storage.storage_filesystem
        path = storage.experiment_fs_path
        if not isinstance(fs, pyarrow.fs.LocalFileSystem):
            if time.monotonic() < self._next:
                return
            self._next = time.monotonic() + REMOTE_EVERY_S
        try:
            seen = [(i.base_name, i.mtime_ns, i.size) for i in _state_infos(fs, path)]
            if seen != self._seen and take_snapshot(fs, path):
                self._seen = seen
        except OSError as e:  # a full disk, an outage: the search goes on, with an older one
            print(f"[lmforge] warning: could not snapshot the search's state in {path}: {e}",
                  file=sys.stderr, flush=True)

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: start afresh
        return {"_seen": None, "_next": 0.0}
