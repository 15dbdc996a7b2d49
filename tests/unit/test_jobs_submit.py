"""lmforge.jobs.submit against a stand-in Jobs API client: what it sends and what it refuses.
(The real Jobs API is exercised by tests/integration/test_submit.py and test_multinode_job.py.)"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge import jobs
from lmforge.train.preempt import STOP_GRACE_S

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


ENVIRON = {"HF_TOKEN": "hf_x", "LMFORGE_API_KEYS": "a,b", "AWS_ACCESS_KEY_ID": "",
           "AWS_SECRET_ACCESS_KEY": "s", "MLFLOW_TRACKING_PASSWORD": "pw",
           "AWS_DEFAULT_REGION": "eu-west-1", "HOME": "/root"}


def test_job_env_sends_no_secret_by_default():
    env = jobs.job_env("http://mlflow:5000", ENVIRON)
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                   "AWS_DEFAULT_REGION": "eu-west-1"}
    assert jobs.secrets_set(ENVIRON, ["train.steps=5", "serve.api_keys=[k]"]) == [
        "LMFORGE_API_KEYS", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
        "serve.api_keys"]


def test_job_env_forwards_secrets_that_are_set_only_when_asked():
    env = jobs.job_env("http://mlflow:5000", ENVIRON, forward_secrets=True)
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_TOKEN": "hf_x",
                   "LMFORGE_API_KEYS": "a,b", "AWS_SECRET_ACCESS_KEY": "s",
                   "MLFLOW_TRACKING_PASSWORD": "pw", "AWS_DEFAULT_REGION": "eu-west-1"}


@pytest.mark.parametrize("name", [
    "LMFORGE_API_KEYS", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "CLIENT_SECRET", "MY_SECRETS_FILE", "DB_PASSWD", "OPENAI_API_KEY", "serve.api_keys"])
def test_is_secret(name: str):
    assert jobs.is_secret(name)


@pytest.mark.parametrize("name", [
    "MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_S3_ENDPOINT_URL", "tokenizer.kind", "serve.max_tokens_limit", "HOME", "MONKEY"])
def test_is_not_secret(name: str):
    assert not jobs.is_secret(name)


def test_credentials_in_a_uri_are_refused_naming_the_field():
    fields = jobs.flat_fields({"tracking": {"uri": "http://bob:hunter2@mlflow:5000"},
                               "train": {"steps": 5}})
    assert fields == {"tracking.uri": "http://bob:hunter2@mlflow:5000", "train.steps": 5}
    with pytest.raises(ValueError, match=r"^tracking\.uri: the URI holds credentials"):
        jobs.check_no_secrets(fields, [], forward_secrets=True)  # never sent, even asked
    with pytest.raises(ValueError, match=r"^MLFLOW_S3_ENDPOINT_URL: "):
        jobs.check_no_secrets({"MLFLOW_S3_ENDPOINT_URL": "https://k:s@minio:9000"}, [])
    jobs.check_no_secrets({"tracking.uri": "http://bob@mlflow:5000", "x": "s3://b/p"}, [])


def test_secret_override_is_refused_unless_forwarding():
    with pytest.raises(ValueError, match=r"^serve\.api_keys: a secret on the command line"):
        jobs.check_no_secrets({}, ["train.steps=5", "serve.api_keys=[k]"])
    jobs.check_no_secrets({}, ["serve.api_keys=[k]"], forward_secrets=True)
    jobs.check_no_secrets({}, ["serve.max_tokens_limit=64", "tokenizer.kind=char"])


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
    assert {"mlflow.db", "mlruns/", "mlartifacts/"} <= set(env["excludes"])
    assert env["py_modules"] == [str(ROOT / "platform" / "lmforge")]
    # Ray Jobs' stop waits this long after its SIGTERM before a SIGKILL (Ray: 3 s), so a
    # stopped run has time to checkpoint.
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "sqlite:///x.db",
                               "RAY_JOB_STOP_WAIT_TIME_S": str(jobs.STOP_WAIT_S)}
    assert jobs.STOP_WAIT_S > STOP_GRACE_S
    assert kw["metadata"]["lmforge.run_name"] == "my-run"


def test_runtime_env_json_adds_to_the_jobs_runtime_env_without_replacing_it(fake):
    """What `--runtime-env-json` gives (pip, env_vars) joins the project's runtime_env; the
    forwarded variables win over the user's env_vars of the same name."""
    f = fake()
    jobs.submit("http://h:8265", SPEC, [], "r", ROOT, {"MLFLOW_TRACKING_URI": "sqlite:///x.db"},
                runtime_env_extra={"pip": ["typer>=0.16"], "working_dir": "/elsewhere",
                                   "env_vars": {"A": "1", "MLFLOW_TRACKING_URI": "no",
                                                "RAY_JOB_STOP_WAIT_TIME_S": "600"}})
    env = f.submitted[0]["runtime_env"]
    assert env["pip"] == ["typer>=0.16"] and env["working_dir"] == str(ROOT)
    assert env["env_vars"] == {"A": "1", "MLFLOW_TRACKING_URI": "sqlite:///x.db",
                               "RAY_JOB_STOP_WAIT_TIME_S": "600"}  # the user's wait wins


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
    # The fake Jobs API runs no job: the preflight is tested on a real cluster instead.
    result = CliRunner().invoke(app, ["submit", str(SPEC.relative_to(ROOT)),
                                      "tracking.run_name=r", "--address", "http://h:8265",
                                      "--no-preflight"])
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


def _submit_cli(*args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from lmforge.cli import app

    # The fake Jobs API runs no job: the preflight is tested on its own (below, and on a
    # real cluster in tests/integration/test_submit_preflight.py).
    return CliRunner().invoke(app, ["submit", str(SPEC.relative_to(ROOT)),
                                    "tracking.run_name=r", *args, "--address", "http://h:8265",
                                    *([] if "--preflight" in args else ["--no-preflight"])])


def test_a_failed_preflight_submits_nothing_and_says_why(fake, monkeypatch):
    from lmforge import preflight

    monkeypatch.chdir(ROOT)
    seen = []

    def refuse(jobs_client, runtime_env):  # noqa: ANN001, ANN202
        seen.append(runtime_env)
        raise preflight.PreflightError("the job's `python` (/usr/bin/python3): missing typer")

    monkeypatch.setattr(preflight, "check", refuse)
    f = fake()
    result = _submit_cli("--preflight", "--runtime-env-json", '{"pip": ["typer"]}')
    assert result.exit_code == 1 and f.submitted == []
    assert "not submitted the job's `python` (/usr/bin/python3): missing typer" in \
        " ".join(result.stderr.split())
    # The preflight job gets the run's runtime_env, less the project upload.
    assert seen[0]["pip"] == ["typer"] and "working_dir" not in seen[0]
    assert seen[0]["env_vars"]["MLFLOW_TRACKING_URI"]


def test_secret_env_vars_in_runtime_env_json_are_refused(fake, monkeypatch):
    monkeypatch.chdir(ROOT)
    f = fake()
    result = _submit_cli("--runtime-env-json", '{"env_vars": {"HF_TOKEN": "x"}}')
    assert result.exit_code == 2 and f.submitted == []
    assert "env_vars HF_TOKEN are secrets" in " ".join(result.stderr.split())
    result = _submit_cli("--runtime-env-json", "[1]")
    assert result.exit_code == 2 and "expected a JSON object" in result.stderr


def test_submit_keeps_secrets_out_of_the_job_and_says_so(fake, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LMFORGE_API_KEYS", "k1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    f = fake()
    result = _submit_cli()
    assert result.exit_code == 0, result.output
    (kw,) = f.submitted
    assert not {"LMFORGE_API_KEYS", "AWS_SECRET_ACCESS_KEY"} & set(kw["runtime_env"]["env_vars"])
    assert "k1" not in str(kw)
    stderr = " ".join(result.stderr.split())
    assert "Not sent with the job (secrets): LMFORGE_API_KEYS, AWS_SECRET_ACCESS_KEY" in stderr


def test_forward_secrets_sends_them_with_a_warning_naming_what_ray_exposes(fake, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LMFORGE_API_KEYS", "k1")
    f = fake()
    result = _submit_cli("serve.api_keys=[k2]", "--forward-secrets")
    assert result.exit_code == 0, result.output
    (kw,) = f.submitted
    assert kw["runtime_env"]["env_vars"]["LMFORGE_API_KEYS"] == "k1"
    assert "serve.api_keys=[k2]" in kw["entrypoint"]
    stderr = " ".join(result.stderr.split())
    assert "WARNING --forward-secrets: sending LMFORGE_API_KEYS, serve.api_keys" in stderr
    assert "ray job list" in stderr and "dashboard" in stderr


def test_submit_refuses_a_secret_override_or_a_uri_with_credentials(fake, monkeypatch):
    monkeypatch.chdir(ROOT)
    f = fake()
    result = _submit_cli("serve.api_keys=[k2]")
    assert result.exit_code == 2 and "serve.api_keys: a secret on the command line" in \
        " ".join(result.stderr.split())
    result = _submit_cli("tracking.uri=http://bob:pw@mlflow:5000")
    assert result.exit_code == 2 and "tracking.uri: the URI holds credentials" in \
        " ".join(result.stderr.split())
    assert "pw" not in result.stderr
    assert f.submitted == []
