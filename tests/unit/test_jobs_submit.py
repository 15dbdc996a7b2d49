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
                         {"MLFLOW_TRACKING_URI": "sqlite:///x.db"}, resume=True).job_id
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


def job(n: int, status: str, run_name: str = "r") -> SimpleNamespace:
    """An earlier job of `run_name`, the n-th to start."""
    return SimpleNamespace(submission_id=f"lmforge-{run_name}-{n}", status=status,
                           start_time=1_700_000_000_000 + n, metadata={
                               "lmforge.run_name": run_name})


def resume_flag(f: FakeJobs) -> str | None:
    (kw,) = f.submitted
    args = shlex.split(kw["entrypoint"])
    assert "tracking.run_name=r" in args  # always the same run, named
    return args[-1] if args[-1].startswith("--") else None


@pytest.mark.parametrize("status", ["PENDING", "RUNNING"])
def test_a_run_that_is_still_going_is_not_submitted_twice(fake, status):
    f = fake(job(1, "FAILED"), job(2, status))
    with pytest.raises(jobs.SubmitError, match=f"run 'r' is already {status} as job lmforge-r-2"):
        jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {}, resume=True)
    assert f.submitted == []


@pytest.mark.parametrize("status", ["FAILED", "STOPPED"])
def test_resubmitting_a_run_whose_last_job_failed_or_stopped_resumes_it(fake, status):
    f = fake(job(1, "FAILED"), job(2, status), job(3, "SUCCEEDED", run_name="other"))
    submitted = jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {})
    assert submitted.resumes.submission_id == "lmforge-r-2"
    # Resumed only if that run got as far as starting: never some other run of the spec.
    assert resume_flag(f) == "--resume-if-started"
    assert f.submitted[0]["metadata"]["lmforge.resume"] == "--resume-if-started"


def test_a_run_that_succeeded_is_refused_unless_resume_is_asked_for(fake):
    f = fake(job(1, "FAILED"), job(2, "SUCCEEDED"))
    with pytest.raises(jobs.SubmitError, match=r"run 'r' already SUCCEEDED as job lmforge-r-2; "
                       r"pass --resume .* tracking.run_name=r-2"):
        jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {})
    assert f.submitted == []
    # --resume continues it all the same (say, with more train.steps).
    submitted = jobs.submit("http://h:8265", SPEC, ["train.steps=900"], "r", ROOT, {},
                            resume=True)
    assert resume_flag(f) == "--resume" and submitted.resumes is None


def test_the_last_job_to_start_decides(fake):
    # A finished run extended with --resume whose job then failed: resumed again.
    f = fake(job(2, "FAILED"), job(1, "SUCCEEDED"))
    assert jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {}).resumes.submission_id \
        == "lmforge-r-2"
    assert resume_flag(f) == "--resume-if-started"


def test_a_new_run_name_starts_a_new_run(fake):
    f = fake(job(1, "FAILED", run_name="r-old"), job(2, "SUCCEEDED", run_name="r2"))
    assert jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {}).resumes is None
    assert resume_flag(f) is None and f.submitted[0]["metadata"]["lmforge.resume"] == "no"


def test_submit_says_on_stderr_when_it_resumes_by_itself(fake, monkeypatch):
    from typer.testing import CliRunner

    from lmforge.cli import app

    monkeypatch.chdir(ROOT)  # the project submit ships
    f = fake(job(1, "STOPPED"))
    result = CliRunner().invoke(app, ["submit", str(SPEC.relative_to(ROOT)),
                                      "tracking.run_name=r", "--address", "http://h:8265"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f.submitted[0]["submission_id"]
    assert "Resuming run r: its last job lmforge-r-1 STOPPED" in " ".join(result.stderr.split())


def test_spec_outside_the_project_is_refused(tmp_path: Path, fake):
    fake()
    spec = tmp_path / "x.yaml"
    spec.write_text("{}")
    with pytest.raises(ValueError, match="must live inside the project"):
        jobs.submit("http://h:8265", spec, [], "r", ROOT, {})


def test_resume_if_started_continues_this_run_or_starts_it(tmp_path: Path):
    """What the resubmitted job decides on the cluster, where the storage is."""
    from lmforge.config import load
    from lmforge.runs import NamedRun, RunState, resume_target

    spec = load(SPEC, [f"train.storage_path={tmp_path}", "tracking.run_name=r"])
    state = RunState("parent", "0", "sqlite:///x.db")
    NamedRun("tiny-20250101-000000", str(tmp_path)).record(state)  # another run of the spec
    assert resume_target(spec, False, SPEC).name == "tiny-20250101-000000"  # --resume
    run = NamedRun.of(spec, search=False)
    assert not run.started()  # but r never started: start it, do not continue the other
    run.record(state)
    assert run.started() and resume_target(spec, False, SPEC).name == "r"
