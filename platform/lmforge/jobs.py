"""Ray Jobs API: submit a spec to a running cluster, follow it, stop it."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from lmforge.train.preempt import STOP_GRACE_S

AGENT_WAIT_S = 60
T = TypeVar("T")
# Local state never travels: a stray MLflow store (mlflow.db, mlruns/, mlartifacts/) in the
# project would be uploaded to the cluster's GCS with the code, run history and models too.
_EXCLUDES = [".venv/", "runs/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/",
             "mlflow.db", "mlruns/", "mlartifacts/"]


def _enable_token_auth() -> None:
    """Send the cluster's auth token. A `ray start --head` cluster enforces the token in
    ~/.ray/auth_token, but Ray's HTTP clients only attach it in token mode, which a client
    process does not enter by itself: without this every Jobs API call is a 401. Ray's own
    helper finds the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and
    refreshes Ray's cached config; an explicit RAY_AUTH_MODE is left as the user set it."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def client(address: str) -> JobSubmissionClient:
    _enable_token_auth()
    return JobSubmissionClient(address)


# What a job needs from the submitter's environment when set. Secrets among them (`is_secret`)
# are not sent unless asked: Ray keeps a job's runtime_env, entrypoint and metadata in the
# clear and returns them to anyone who can list jobs (`ray job list`, the Jobs API, the
# dashboard). The cluster's nodes get secrets from their own environment instead
# (docs/clusters.md#secrets).
FORWARDED_ENV = ("LMFORGE_API_KEYS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL",
                 "GOOGLE_APPLICATION_CREDENTIALS")
_SECRET = re.compile(r"(?:^|_)(?:SECRETS?|TOKEN|PASSWORD|PASSWD|KEYS?)(?:_|$)")
EXPOSED = ("Ray stores a job's runtime_env and entrypoint in the clear and shows them to anyone "
           "who can reach the cluster's dashboard or Jobs API (`ray job list`, the dashboard's "
           "job page) for as long as the job is kept")


def is_secret(name: str) -> bool:
    """The one rule for what is a secret: an environment variable or a spec field
    (`serve.api_keys`) with a word SECRET(S), TOKEN, PASSWORD, PASSWD or KEY(S) in its name
    (AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, HF_TOKEN, LMFORGE_API_KEYS). Whole words:
    `tokenizer.kind` and `serve.max_tokens_limit` are not secrets. A secret never travels
    in a job's metadata unless the user asks."""
    return bool(_SECRET.search(re.sub(r"[.\-]", "_", name.upper())))


STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
STOP_WAIT_S = int(STOP_GRACE_S) + 30
"""What `ray job stop` waits between its SIGTERM to the driver and a SIGKILL (Ray's
default: 3 s), set in the job's runtime_env: Ray's job supervisor reads the variable from
its own environment, which Ray builds from the job's `runtime_env.env_vars`
(`JobManager._get_supervisor_runtime_env`, Ray 2.60). Long enough for a search's trials to
checkpoint (`STOP_GRACE_S`), then for Tune to save its state and the driver to mark its
MLflow runs KILLED. `--runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": ...}}'`
sets another."""

ACTIVE = ("PENDING", "RUNNING")
RUN_NAME_KEY = "lmforge.run_name"


class SubmitError(RuntimeError):
    """The cluster refused the job (duplicate id, the run running or done), said why."""


@dataclass(frozen=True)
class Submitted:
    job_id: str
    resumes: JobDetails | None = None
    """The run's last job, when it ended FAILED or STOPPED and this job therefore resumes
    the run by itself."""


def job_env(tracking_uri: str, environ: dict[str, str], forward_secrets: bool = False
            ) -> dict[str, str]:
    """The job's env_vars: the MLflow tracking URI plus the FORWARDED_ENV set in `environ`,
    the secrets among them only with `forward_secrets`."""
    return {"MLFLOW_TRACKING_URI": tracking_uri} | {
        k: environ[k] for k in FORWARDED_ENV
        if environ.get(k) and (forward_secrets or not is_secret(k))}


def secrets_set(environ: dict[str, str], overrides: list[str]) -> list[str]:
    """The FORWARDED_ENV secrets set in `environ` and the secret fields `overrides` set:
    what `job_env` and `check_no_secrets` keep out of the job unless forward_secrets."""
    return [k for k in FORWARDED_ENV if environ.get(k) and is_secret(k)] + [
        key for o in overrides if is_secret(key := o.split("=", 1)[0])]


def check_no_secrets(fields: dict[str, Any], overrides: list[str],
                     forward_secrets: bool = False) -> None:
    """Refuse, naming the field, what would put a secret in the job's metadata: a URI with
    credentials in it (`scheme://user:password@host`), anywhere in the spec or the
    environment sent (always: there is a place for each credential), and an override of a
    secret field such as `serve.api_keys=[...]` on the command line (unless
    `forward_secrets`). `fields`: dotted spec paths and env names to their values."""
    for field, value in fields.items():
        if isinstance(value, str) and "://" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                continue
            if password is not None:
                raise ValueError(
                    f"{field}: the URI holds credentials (user:password@), which would "
                    f"travel in the job's metadata; {EXPOSED}. Give the cluster's nodes the "
                    "credentials by environment (for MLflow: MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD; docs/clusters.md#secrets) and drop them "
                    "from the URI")
    for override in overrides:
        key = override.split("=", 1)[0]
        if is_secret(key) and not forward_secrets:
            raise ValueError(
                f"{key}: a secret on the command line would travel in the job's entrypoint; "
                f"{EXPOSED}. Give the cluster's nodes LMFORGE_API_KEYS (or the secret's own "
                "variable) by environment (docs/clusters.md#secrets), or pass "
                "--forward-secrets to send it anyway")


def flat_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (a spec's model_dump) as {dotted.path: leaf value}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= flat_fields(v, f"{prefix}{k}.")
        return out
    if isinstance(tree, list):
        out = {}
        for i, v in enumerate(tree):
            out |= flat_fields(v, f"{prefix}{i}.")
        return out
    return {prefix.rstrip("."): tree}


def entrypoint(spec_rel: str, overrides: list[str], run_name: str,
               resume_flag: str | None = None) -> list[str]:
    """`python -m lmforge run SPEC k=v... tracking.run_name=NAME [--resume...]`: a fixed run
    name, so a resubmission can continue the same Ray Train / Tune run."""
    return ["python", "-m", "lmforge", "run", spec_rel, *overrides,
            f"tracking.run_name={run_name}", *([resume_flag] if resume_flag else [])]


def submit(address: str, spec_path: Path, overrides: list[str], run_name: str,
           project_root: Path, env: dict[str, str], submission_id: str | None = None,
           resume: bool = False, runtime_env_extra: dict[str, Any] | None = None
           ) -> Submitted:
    """Submit `lmforge run SPEC` with the project as the job's working_dir.

    `runtime_env_extra` (`--runtime-env-json`: pip, uv, conda, env_vars) is merged in.
    The job id is `submission_id`, or the run name plus a random suffix. What the cluster's
    earlier jobs tagged with this run name decide (`_last_unfinished`): the job runs with
    `--resume` when asked, with `--resume-if-started` when the run's last job FAILED or was
    STOPPED, and is refused when the id is taken, the run is still PENDING or RUNNING (two
    drivers must not write one run) or it already SUCCEEDED.
    """
    spec = spec_path.resolve()
    root = project_root.resolve()
    if not spec.is_relative_to(root):
        raise ValueError(f"{spec_path}: the spec must live inside the project ({root}), "
                         "which is shipped to the cluster as the job's working_dir")
    runtime_env: dict[str, Any] = {
        **(runtime_env_extra or {}),  # the user's pip/uv/conda: what the preflight checked
        "working_dir": str(root),
        "excludes": _EXCLUDES,
        "env_vars": {STOP_WAIT_ENV: str(STOP_WAIT_S),
                     **(runtime_env_extra or {}).get("env_vars", {}), **env},
    }
    if (root / "platform" / "lmforge").is_dir():
        runtime_env["py_modules"] = [str(root / "platform" / "lmforge")]
    job_id = submission_id or \
        f"lmforge-{re.sub(r'[^A-Za-z0-9_-]', '-', run_name)}-{uuid.uuid4().hex[:6]}"
    jobs_client = client(address)

    def attempt() -> Submitted:
        try:
            last = _last_unfinished(jobs_client, job_id, run_name, resume)
            flag = "--resume" if resume else "--resume-if-started" if last else None
            args = entrypoint(str(spec.relative_to(root)), overrides, run_name, flag)
            return Submitted(jobs_client.submit_job(
                entrypoint=shlex.join(args), runtime_env=runtime_env, submission_id=job_id,
                metadata={RUN_NAME_KEY: run_name, "lmforge.spec": str(spec_path),
                          "lmforge.resume": flag or "no"},
            ), last)
        except RuntimeError as e:
            if "already exists" in str(e):  # Ray's own check, should another client race us
                raise SubmitError(f"job id {job_id!r} already exists on {address}; "
                                  "it is not overwritten (choose another --submission-id)"
                                  ) from None
            raise

    return when_agent_ready(attempt)


def when_agent_ready(call: Callable[[], T]) -> T:
    """`call()`, retried for up to AGENT_WAIT_S while the head says its job agent is not
    up: a freshly started head answers the Jobs API before its agent, with a 500 saying
    so, and that one error should not fail the user."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return call()
        except RuntimeError as e:
            if isinstance(e, SubmitError) or "No available agent" not in str(e) \
                    or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _last_unfinished(jobs_client: JobSubmissionClient, job_id: str, run_name: str,
                     resume: bool) -> JobDetails | None:
    """The last job of `run_name` when it ended FAILED or STOPPED (the new job resumes the
    run), else None. Refuses a known job id, a run still PENDING or RUNNING, and a run whose
    last job SUCCEEDED unless `resume` asks to continue it (say, with more train.steps)."""
    runs = []
    for job in jobs_client.list_jobs():
        if job.submission_id == job_id:
            raise SubmitError(f"job id {job_id!r} already exists ({job.status}); it is not "
                              "overwritten (choose another --submission-id)")
        if (job.metadata or {}).get(RUN_NAME_KEY) == run_name:
            if job.status in ACTIVE:
                raise SubmitError(f"run {run_name!r} is already {job.status} as job "
                                  f"{job.submission_id}; stop it first or wait for it to end")
            runs.append(job)
    if resume or not runs:
        return None
    last = max(runs, key=lambda j: j.start_time or 0)
    if last.status == "SUCCEEDED":
        raise SubmitError(f"run {run_name!r} already SUCCEEDED as job {last.submission_id}; "
                          "pass --resume to continue it, or set another tracking.run_name "
                          f"(e.g. tracking.run_name={run_name}-2) for a new run")
    return last


def status(address: str, job_id: str) -> JobStatus:
    return client(address).get_job_status(job_id)


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def follow(address: str, job_id: str) -> JobStatus:
    """Stream the job's logs to stdout until it ends; return its final status."""
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    while not (final := c.get_job_status(job_id)).is_terminal():
        time.sleep(0.5)  # the log stream closed just before the status flipped
    return final
