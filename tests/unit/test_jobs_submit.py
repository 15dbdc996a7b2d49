"""lmforge.jobs.submit against a stand-in Jobs API client: what it sends and what it refuses.
(The real Jobs API is exercised by tests/integration/test_submit.py and test_multinode_job.py.)"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge import jobs

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "tests" / "integration" / "specs" / "tiny.yaml"


class FakeJobs:
    def __init__(self, existing: list[SimpleNamespace] = ()):
        self.existing, self.submitted = list(existing), []

    def list_jobs(self):
        return self.existing

    def submit_job(self, **kw):
        self.submitted.append(kw)
        return kw["submission_id"]


@pytest.fixture
def fake(monkeypatch):
    def use(*existing: SimpleNamespace) -> FakeJobs:
        f = FakeJobs(existing)
        monkeypatch.setattr(jobs, "client", lambda address: f)
        return f
    return use


def test_job_env_forwards_only_secrets_that_are_set():
    env = jobs.job_env("http://mlflow:5000", {"HF_TOKEN": "hf_x", "LMFORGE_API_KEYS": "a,b",
                                               "AWS_ACCESS_KEY_ID": "", "HOME": "/root"})
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_TOKEN": "hf_x",
                   "LMFORGE_API_KEYS": "a,b"}


def test_submit_packages_the_project_and_tags_the_run(fake):
    f = fake()
    job_id = jobs.submit("http://h:8265", SPEC, ["train.steps=5"], "my-run", ROOT,
                         {"MLFLOW_TRACKING_URI": "sqlite:///x.db"}, resume=True)
    (kw,) = f.submitted
    assert job_id == kw["submission_id"] and job_id.startswith("lmforge-my-run-")
    assert shlex.split(kw["entrypoint"]) == [
        "python", "-m", "lmforge", "run", "tests/integration/specs/tiny.yaml",
        "train.steps=5", "tracking.run_name=my-run", "--resume"]
    env = kw["runtime_env"]
    assert env["working_dir"] == str(ROOT) and ".venv/" in env["excludes"]
    assert env["py_modules"] == [str(ROOT / "platform" / "lmforge")]
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "sqlite:///x.db"}
    assert kw["metadata"]["lmforge.run_name"] == "my-run"


def test_duplicate_submission_id_is_refused_not_overwritten(fake):
    f = fake(SimpleNamespace(submission_id="mine", status="SUCCEEDED", metadata={}))
    with pytest.raises(jobs.SubmitError, match="'mine' already exists .*not overwritten"):
        jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {}, submission_id="mine")
    assert f.submitted == []


def test_a_run_that_is_still_running_is_not_submitted_twice(fake):
    running = SimpleNamespace(submission_id="lmforge-r-1", status="RUNNING",
                              metadata={"lmforge.run_name": "r"})
    fake(running)
    with pytest.raises(jobs.SubmitError, match="run 'r' is already RUNNING as job lmforge-r-1"):
        jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {})
    # Once it ended, the same run name may be submitted again (to resume it).
    f = fake(SimpleNamespace(submission_id="lmforge-r-1", status="FAILED",
                             metadata={"lmforge.run_name": "r"}))
    jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {}, resume=True)
    assert len(f.submitted) == 1


def test_spec_outside_the_project_is_refused(tmp_path: Path, fake):
    fake()
    spec = tmp_path / "x.yaml"
    spec.write_text("{}")
    with pytest.raises(ValueError, match="must live inside the project"):
        jobs.submit("http://h:8265", spec, [], "r", ROOT, {})
