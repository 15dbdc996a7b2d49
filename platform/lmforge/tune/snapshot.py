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
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ray import tune

from lmforge.runs import ResumeError

SNAPSHOT_DIR = ".lmforge-state"
_PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
             "tuner.pkl", "callback-states-*.pkl")


def state_files(path: Path) -> list[Path]:
    """Tune's files that `Tuner.restore` reads, in the experiment directory `path`: one
    listing of it (the callback runs this every step of Tune's loop)."""
    return sorted(f for f in path.iterdir()
                  if any(fnmatch(f.name, p) for p in _PATTERNS) and f.is_file())


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def latest_snapshot(path: Path) -> Path | None:
    """The newest complete snapshot of experiment directory `path`, if there is one."""
    root = path / SNAPSHOT_DIR
    try:
        name = (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    return root / name if name and (root / name).is_dir() else None


def take_snapshot(path: Path) -> bool:
    """Copy Tune's state files of `path` into a new snapshot if each one is whole (Tune may
    be writing one right now: then try again later). Returns whether it took one."""
    contents = {f.name: f.read_bytes() for f in state_files(path)}
    if not contents or not all(intact(data) for data in contents.values()):
        return False
    root = path / SNAPSHOT_DIR
    new = root / str(time.time_ns())
    new.mkdir(parents=True)
    for name, data in contents.items():  # the bytes checked above, not a second read
        (new / name).write_bytes(data)
    _write_atomic(root / "LATEST", new.name.encode())
    for old in root.iterdir():  # older snapshots; a damaged set put aside stays
        if old.name.isdigit() and old != new:
            shutil.rmtree(old, ignore_errors=True)
    return True


def repair(path: Path) -> list[str]:
    """Before `Tuner.restore`: if any of Tune's state files in `path` is damaged, move the
    current set into `.lmforge-state/damaged-<time>/` and put the latest snapshot back.
    Returns the damaged files' names ([] when all were whole)."""
    files = state_files(path)
    damaged = [f.name for f in files if not intact(f.read_bytes())]
    if not damaged:
        return []
    snapshot = latest_snapshot(path)
    if snapshot is None:
        raise ResumeError(
            f"{path}: Ray Tune's state of this search is damaged ({', '.join(damaged)} cut "
            "short, as when the driver is killed while writing it) and no intact copy was "
            "kept (it was killed before the first one). Start the search again under "
            "another tracking.run_name")
    aside = path / SNAPSHOT_DIR / f"damaged-{time.time_ns()}"
    aside.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, aside / f.name)
    # File by file atomically, so a kill during the repair leaves each file whole or still
    # damaged, and the next --resume repairs again.
    restored = {f.name: f.read_bytes() for f in snapshot.iterdir()}
    for name, data in restored.items():
        _write_atomic(path / name, data)
    for f in files:
        if f.name not in restored:  # newer than the snapshot; its copy is aside
            f.unlink()
    return damaged


class StateSnapshots(tune.Callback):
    """Takes a snapshot whenever Tune's state files in the experiment directory change.

    Called after every step of Tune's loop; a step costs one directory listing and a stat
    per file unless Tune has synced a new state since the last snapshot."""

    def __init__(self) -> None:
        self._seen: Any = None

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not trials:
            return
        path = Path(trials[0].storage.experiment_fs_path)
        if not path.is_absolute():  # remote storage (s3://...): Tune's files are not here
            return
        try:
            seen = [(f.name, f.stat()) for f in state_files(path)]
            seen = [(name, st.st_mtime_ns, st.st_size) for name, st in seen]
            if seen != self._seen and take_snapshot(path):
                self._seen = seen
        except OSError as e:  # a full disk, say: the search goes on, with an older snapshot
            print(f"[lmforge] warning: could not snapshot the search's state in {path}: {e}",
                  file=sys.stderr, flush=True)

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: start afresh
        return {"_seen": None}
