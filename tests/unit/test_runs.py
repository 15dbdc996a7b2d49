"""A named run's state: one rule for training runs and searches alike (lmforge.runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge.config import JobSpec
from lmforge.runs import STATE_FILE, NamedRun, ResumeError, RunExists, RunState, resume_target

STATE = RunState("parent-run", "7", "sqlite:////tmp/m.db", {"num_trials": 4})


def spec(tmp_path: Path, name: str | None = "r") -> JobSpec:
    return JobSpec.model_validate({
        "train": {"storage_path": str(tmp_path / "train")},
        "tune": {"storage_path": str(tmp_path / "tune")},
        "tracking": {"run_name": name}})


def tune_state(run: NamedRun) -> None:
    """What Ray Tune leaves in an experiment it can restore (Tuner.can_restore looks for
    tuner.pkl)."""
    (Path(run.path) / "tuner.pkl").write_bytes(b"")


@pytest.mark.parametrize("search", [False, True])
def test_a_run_lives_under_the_storage_path_of_its_kind(tmp_path: Path, search: bool):
    run = NamedRun.of(spec(tmp_path), search=search)
    kind = "tune" if search else "train"
    assert run.path == str(tmp_path / kind / "r")
    assert run.storage_field == f"{kind}.storage_path"


@pytest.mark.parametrize("search", [False, True])
def test_state_round_trips_and_is_written_whole(tmp_path: Path, search: bool):
    run = NamedRun.of(spec(tmp_path), search=search)
    with pytest.raises(ResumeError, match="never started"):
        run.state()
    run.record(STATE)
    assert run.state() == STATE
    assert sorted(os.listdir(run.path)) == [STATE_FILE]  # no temporary file left behind


def test_a_training_run_started_once_its_state_is_recorded(tmp_path: Path):
    run = NamedRun.of(spec(tmp_path), search=False)
    assert not run.started()
    run.record(STATE)
    assert run.started()


def test_a_search_started_once_tune_can_restore_it_too(tmp_path: Path):
    run = NamedRun.of(spec(tmp_path), search=True)
    run.record(STATE)
    assert not run.started()  # killed before Tune saved anything: nothing to restore
    tune_state(run)
    assert run.started()


def test_only_rays_state_makes_a_run_exist(tmp_path: Path):
    run = NamedRun.of(spec(tmp_path), search=False)
    run.require_new()
    run.record(STATE)  # stopped before Ray started anything: may start again
    run.require_new()
    (Path(run.path) / "checkpoint_000010").mkdir()
    with pytest.raises(RunExists, match=r"run 'r' already exists under train\.storage_path"):
        run.require_new()


def test_resume_takes_the_named_run_when_it_started(tmp_path: Path):
    s = spec(tmp_path)
    NamedRun("job-20990101-000000", s.train.storage_path).record(STATE)
    NamedRun.of(s, search=False).record(STATE)
    assert resume_target(s, False, "jobs/job.yaml").name == "r"


@pytest.mark.parametrize("search", [False, True])
def test_resume_otherwise_takes_the_newest_started_run_of_the_spec(tmp_path: Path,
                                                                   search: bool):
    """Newest by when its state was recorded, for training runs and searches alike (a name
    that sorts last is not newer)."""
    s = spec(tmp_path, name="never-started")
    storage = s.tune.storage_path if search else s.train.storage_path
    for name, when in (("job-zzz", 1_000), ("job-20260101-000000", 3_000),
                       ("job-20270101-000000", 2_000), ("other-20990101-000000", 9_000)):
        run = NamedRun(name, storage, search)
        run.record(STATE)
        if search:
            tune_state(run)
        os.utime(Path(run.path) / STATE_FILE, (when, when))
    NamedRun("job-20990101-000000", storage, search)._fs()[0].create_dir(
        f"{storage}/job-20990101-000000")  # never started: no state
    assert resume_target(s, search, "jobs/job.yaml").name == "job-20260101-000000"


def test_resume_with_nothing_to_resume_names_the_storage_field(tmp_path: Path):
    with pytest.raises(ResumeError, match=r"tune\.storage_path .*no search named 'r' or "
                                          r"job-\* to resume; start one with `lmforge tune`"):
        resume_target(spec(tmp_path), True, "jobs/job.yaml")


def test_a_training_resume_never_picks_a_search_and_the_other_way_round(tmp_path: Path):
    """Searches and training runs may share one storage path (runs/ray by default)."""
    storage = str(tmp_path / "ray")
    s = JobSpec.model_validate({"train": {"storage_path": storage},
                                "tune": {"storage_path": storage},
                                "tracking": {"run_name": "job-x"}})
    search = NamedRun("job-20990101-000000", storage, search=True)
    search.record(STATE)
    tune_state(search)
    train = NamedRun("job-20200101-000000", storage)
    train.record(STATE)
    assert not NamedRun(search.name, storage).started()
    assert not NamedRun(train.name, storage, search=True).started()
    assert resume_target(s, False, "jobs/job.yaml").name == train.name
    assert resume_target(s, True, "jobs/job.yaml").name == search.name


def test_a_search_recorded_by_an_earlier_lmforge_still_resumes(tmp_path: Path):
    run = NamedRun.of(spec(tmp_path), search=True)
    Path(run.path).mkdir(parents=True)
    (Path(run.path) / "lmforge_search.json").write_text(json.dumps({
        "parent_run_id": "p", "experiment_id": "1", "tracking_uri": "u",
        "tune": {"num_trials": 4}}))
    tune_state(run)
    assert run.started()
    assert run.state() == RunState("p", "1", "u", {"num_trials": 4})


def test_run_names_are_plain_names_and_spec_files_give_one(tmp_path: Path):
    from lmforge.config import SpecError, default_run_name, load

    for bad in ("../escape", "a/b", "", "-x", "x" * 129, "tab\tname"):
        with pytest.raises(SpecError, match="tracking.run_name: must be letters, digits"):
            load(None, [f"tracking.run_name={bad!r}"])
    assert load(None, ["tracking.run_name=run-1_a.b"]).tracking.run_name == "run-1_a.b"
    name = default_run_name(tmp_path / "my spec (2).yaml")
    assert name.startswith("my-spec--2--") and load(None, [f"tracking.run_name={name}"])
