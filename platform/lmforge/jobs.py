"""Ray Jobs API: submit a spec to a running cluster, follow it, stop it."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

AGENT_WAIT_S = 60
_EXCLUDES = [".venv/", "runs/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]


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


def submit(address: str, spec_path: Path, overrides: list[str], run_name: str,
           project_root: Path, env: dict[str, str]) -> str:
    """Submit `lmforge run SPEC` with the project as the job's working_dir; return the job id.

    The job id is the run name plus a random suffix, so resubmitting never overwrites a job.
    """
    spec = spec_path.resolve()
    root = project_root.resolve()
    if not spec.is_relative_to(root):
        raise ValueError(f"{spec_path}: the spec must live inside the project ({root}), "
                         "which is shipped to the cluster as the job's working_dir")
    args = ["python", "-m", "lmforge", "run", str(spec.relative_to(root)), *overrides,
            f"tracking.run_name={run_name}"]
    runtime_env: dict[str, Any] = {
        "working_dir": str(root),
        "excludes": _EXCLUDES,
        "env_vars": env,
    }
    if (root / "platform" / "lmforge").is_dir():
        runtime_env["py_modules"] = [str(root / "platform" / "lmforge")]
    job_id = f"lmforge-{re.sub(r'[^A-Za-z0-9_-]', '-', run_name)}-{uuid.uuid4().hex[:6]}"
    jobs_client = client(address)
    # A freshly started head answers the Jobs API before its job agent is up and says so
    # with a 500; retry that one error for a bounded time instead of failing the user.
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return jobs_client.submit_job(
                entrypoint=shlex.join(args), runtime_env=runtime_env, submission_id=job_id,
                metadata={"lmforge.run_name": run_name, "lmforge.spec": str(spec_path)},
            )
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


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
