"""A named run: one training run or one search, by its name, under its storage path.

The CLI, the pipeline and a resubmitted job all ask the same questions of a run, and this
module is the one place that answers them:

- where its state lives: `STORAGE/NAME/`, the directory Ray Train (`train.storage_path`)
  or Ray Tune (`tune.storage_path`) keeps the run in, local or an object-store URI;
- whether it exists (a new run of that name is refused) and whether it started (it
  recorded its MLflow run, so `--resume` can continue it under that run);
- which run `--resume` continues: `tracking.run_name`'s when it started, else the newest
  started run of the same spec file, newest by when its state was recorded.

The state file (`lmforge_run.json`) holds the MLflow parent run, its experiment and
tracking URI, and the settings a resume must not change (a search's `tune.*`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow.fs

from lmforge.config import JobSpec, run_name_stem
from lmforge.storage import StoragePath, require_shared, resolve

STATE_FILE = "lmforge_run.json"
_OLD_SEARCH_STATE = "lmforge_search.json"  # what searches recorded before this module


class RunExists(RuntimeError):
    """A run of this name already has state in storage and resuming was not asked for."""


class ResumeError(RuntimeError):
    """`--resume` cannot continue: no run or search to continue, or one that the spec
    contradicts."""


@dataclass(frozen=True)
class RunState:
    """What a run records when it starts, and a resume reads back."""

    parent_run_id: str
    """The MLflow run the whole run (a search's parent) logs to."""
    experiment_id: str
    tracking_uri: str
    settings: dict[str, Any] = field(default_factory=dict)
    """Settings the run keeps for its whole life (a search's `tune.*`, which Tune restores
    from its own state): a resume that asks for others is refused."""


@dataclass(frozen=True)
class NamedRun:
    """A training run (`search=False`) or a search, named `name`, under `storage_path`."""

    name: str
    storage_path: str
    search: bool = False

    @classmethod
    def of(cls, spec: JobSpec, search: bool, name: str | None = None) -> NamedRun:
        """`name` (default `tracking.run_name`) under the storage path of its kind."""
        storage = spec.tune.storage_path if search else spec.train.storage_path
        return cls(name or spec.tracking.run_name or "lmforge", storage, search)

    @property
    def storage_field(self) -> str:
        return "tune.storage_path" if self.search else "train.storage_path"

    @property
    def kind(self) -> str:
        return "search" if self.search else "run"

    @cached_property
    def storage(self) -> StoragePath:
        """The run's directory (`STORAGE/NAME`), resolved."""
        return resolve(self.storage_path, self.storage_field).join(self.name)

    @property
    def path(self) -> str:
        """The run's directory as the user wrote it (local path or URI)."""
        return self.storage.uri

    def _fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        return self.storage.fs, self.storage.path

    def _recorded(self) -> tuple[dict[str, Any], pyarrow.fs.FileInfo] | None:
        """The state file's contents and listing entry, when this run recorded one; a file
        of the other kind (a search's, seen from training) or unreadable is none."""
        fs, inner = self._fs()
        for file in (STATE_FILE, _OLD_SEARCH_STATE) if self.search else (STATE_FILE,):
            info = fs.get_file_info(f"{inner}/{file}")
            if info.type != pyarrow.fs.FileType.File:
                continue
            try:
                with fs.open_input_stream(info.path) as f:
                    raw = json.loads(f.read())
            except (OSError, ValueError):
                return None
            # Files from before "kind" was recorded: lmforge_search.json held searches only.
            kind = raw.get("kind", "search" if file == _OLD_SEARCH_STATE else "run")
            return (raw, info) if kind == self.kind else None
        return None

    def exists(self) -> bool:
        """Whether Ray Train or Tune holds state under this name, which a new run would
        silently continue. Our state file alone does not count: a run that stopped before
        Ray started anything may start again under its name."""
        fs, inner = self._fs()
        if not self.name:
            return False
        listing = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
        ours = {STATE_FILE, _OLD_SEARCH_STATE, f".{STATE_FILE}.tmp"}
        return any(i.base_name not in ours for i in listing)

    def started(self) -> bool:
        """Whether the run got as far as recording its MLflow run (and, for a search, Tune's
        state), so that `--resume` can continue it."""
        if not self.name or self._recorded() is None:
            return False
        if not self.search:
            return True
        from ray import tune  # Tune's own test of a restorable experiment

        where = self.storage.ray_storage()
        return tune.Tuner.can_restore(where["storage_path"],
                                      storage_filesystem=where["storage_filesystem"])

    def require_new(self) -> None:
        """Refuse to start over a run of the same name: Ray would continue its state."""
        if self.exists():
            raise RunExists(f"{self.kind} {self.name!r} already exists under "
                            f"{self.storage_field} ({self.storage_path}); pass --resume to "
                            "continue it, or set another tracking.run_name")

    def record(self, state: RunState) -> None:
        """Write the state file whole or not at all (a temporary file, then a rename; an
        object store's put is atomic by itself)."""
        fs, inner = self._fs()
        fs.create_dir(inner, recursive=True)
        tmp = f"{inner}/.{STATE_FILE}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps({"kind": self.kind, **asdict(state)}, indent=2).encode())
        fs.move(tmp, f"{inner}/{STATE_FILE}")

    def state(self) -> RunState:
        """The state recorded when the run started; ResumeError when there is none."""
        recorded = self._recorded()
        if recorded is None:
            raise ResumeError(f"{self.kind} {self.name!r} under {self.storage_field} "
                              f"({self.storage_path}) never started: nothing to resume")
        raw = recorded[0]
        settings = raw.get("settings", raw.get("tune")) or {}  # older searches: "tune"
        return RunState(raw["parent_run_id"], raw.get("experiment_id", ""),
                        raw.get("tracking_uri", ""), settings)

    def recorded_at(self) -> float:
        """When the state file was written (seconds since the epoch; 0 when never)."""
        recorded = self._recorded()
        mtime = recorded[1].mtime if recorded is not None else None
        return mtime.timestamp() if mtime else 0.0


def resume_target(spec: JobSpec, search: bool, spec_path: str | Path | None) -> NamedRun:
    """The run `--resume` continues: `tracking.run_name`'s when it started, else the newest
    started run of this spec file (`SPEC_STEM-*`, the default names) under the storage path;
    ResumeError naming the storage field when there is none."""
    named = NamedRun.of(spec, search)
    spec_stem = run_name_stem(spec_path)
    if named.started():
        return named
    root_dir = resolve(named.storage_path, named.storage_field)
    fs, root = root_dir.fs, root_dir.path
    listing = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    candidates = [NamedRun(i.base_name, named.storage_path, search) for i in listing
                  if i.type == pyarrow.fs.FileType.Directory
                  and i.base_name.startswith(f"{spec_stem}-")]
    started = [c for c in candidates if c.started()]
    if not started:
        raise ResumeError(f"{named.storage_field} {named.storage_path}: no {named.kind} named "
                          f"{named.name!r} or {spec_stem}-* to resume; start one with "
                          f"`lmforge {'tune' if search else 'train'}` first")
    return max(started, key=lambda c: (c.recorded_at(), c.name))


def require_shared_storage(spec: JobSpec, search: bool) -> None:
    """Before any worker starts: on a Ray cluster of several hosts, refuse every path field
    the run writes or its workers read (`data.cache_dir`, `train.storage_path`, and for a
    search `tune.storage_path`) that is a local-only directory, naming each field."""
    fields = {"data.cache_dir": spec.data.cache_dir,
              "train.storage_path": spec.train.storage_path}
    if search:
        fields["tune.storage_path"] = spec.tune.storage_path
    require_shared(*(resolve(path, name) for name, path in fields.items()))
