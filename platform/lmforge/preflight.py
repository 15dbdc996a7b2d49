"""Before `lmforge submit` sends a run: does the cluster have what the job needs?

A job runs `python -m lmforge run SPEC` with whichever `python` comes first on the PATH of
the cluster's head node (inside the job's runtime_env), and its Ray tasks run in the
interpreter the raylets were started from. Either may lack lmforge's dependencies: the
usual case is a cluster started with `.venv/bin/ray start --head` from a shell where the
venv is not active, so the job's `python` is the system one, and the job used to fail
minutes later with `ModuleNotFoundError: No module named 'typer'` deep in its log.

`check` submits a short preflight job through the same Jobs API, with the same
runtime_env (minus the project upload, which the check does not need): its entrypoint
looks up each of lmforge's requirements in the job's `python` (installed version, and a
module importable), then runs one zero-CPU Ray task pinned to every alive node that does
the same in the workers' interpreter. Version rules are judged here, with the
requirements of the lmforge installed on this machine. What is missing or the wrong
version is a PreflightError that names it, the interpreter, and the three ways to
provide it.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from lmforge.jobs import when_agent_ready

MARKER = "LMFORGE_PREFLIGHT "
"""The prefix of the one line of JSON the preflight job prints."""
TIMEOUT_S = 180
"""How long a preflight job may take: starting a job takes seconds; a runtime_env with
`pip` installs first (the job reuses that environment, so the time is not lost)."""

# Runs under the cluster's python, which may have nothing but the standard library: no
# lmforge, no Ray (it is imported only when present), Python 3.9+ syntax.
_CHECK = r"""
import importlib.metadata as md, importlib.util, json, platform, socket, sys

def look(wanted):
    found = {}
    for dist, module in wanted.items():
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            version = None
        try:
            importable = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            importable = False
        found[dist] = version if importable else None
    return {"python": sys.executable, "version": platform.python_version(),
            "host": socket.gethostname(), "found": found}

wanted = json.loads(sys.argv[1])
out = {"driver": look(wanted), "nodes": []}
if out["driver"]["found"].get("ray"):
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init(log_to_driver=False)
        remote_look = ray.remote(num_cpus=0)(look)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [remote_look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(wanted) for n in nodes]
        for n, ref in zip(nodes, refs):
            try:
                node = ray.get(ref, timeout=120)
            except Exception as e:
                node = {"error": f"{type(e).__name__}: {e}"[:2000]}
            node["ip"] = n["NodeManagerAddress"]
            out["nodes"].append(node)
    except Exception as e:
        out["ray_error"] = f"{type(e).__name__}: {e}"[:2000]
print(@MARKER@ + json.dumps(out), flush=True)
""".replace("@MARKER@", repr(MARKER))


class PreflightError(RuntimeError):
    """The cluster lacks what the job needs (the message says what and how to provide it),
    or the preflight job could not run at all."""


@dataclass(frozen=True)
class Requirements:
    """lmforge's requirements (from this machine's install), and the module each provides."""

    specs: dict[str, Requirement]
    modules: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_lmforge(cls) -> Requirements:
        reqs = [Requirement(r) for r in importlib.metadata.requires("lmforge") or []]
        specs = {r.name: r for r in reqs if r.marker is None}  # extras (dev) are not needed
        provides: dict[str, list[str]] = {}
        for module, dists in importlib.metadata.packages_distributions().items():
            for d in dists:
                provides.setdefault(_norm(d), []).append(module)
        return cls(specs, {name: _module_of(name, provides.get(_norm(name), []))
                           for name in specs})


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_of(dist: str, modules: list[str]) -> str:
    """The top-level module a distribution is imported as (PyYAML -> yaml)."""
    own = _norm(dist).replace("-", "_")
    public = sorted(m for m in modules if not m.startswith("_"))
    return own if own in modules or not public else public[0]


@dataclass(frozen=True)
class Finding:
    where: str
    """`the job's python (/usr/bin/python3, Python 3.11.2)` or a node's workers."""
    missing: list[str]
    wrong: list[str]
    """`ray 2.59.0 (needs >=2.60,<2.61)`."""


def judge(report: dict[str, Any], reqs: Requirements) -> list[Finding]:
    """What each interpreter of the preflight report lacks ([] when nothing)."""
    places = [("the job's `python`", report["driver"])] + [
        (f"the Ray workers on node {n.get('ip', '?')}", n) for n in report.get("nodes", [])]
    findings = []
    for label, seen in places:
        if "error" in seen:
            findings.append(Finding(f"{label} (the check failed: {seen['error']})", [], []))
            continue
        missing, wrong = [], []
        for name, req in reqs.specs.items():
            version = seen["found"].get(name)
            if version is None:
                missing.append(name)
            elif not _satisfies(version, req):
                wrong.append(f"{name} {version} (needs {req.specifier})")
        if missing or wrong:
            findings.append(Finding(f"{label} ({seen['python']}, Python {seen['version']})",
                                    missing, wrong))
    return findings


def _satisfies(version: str, req: Requirement) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True  # a local build we cannot compare: let the job try


def explain(findings: list[Finding], reqs: Requirements) -> str:
    """The error a user reads: what is missing where, and the three ways to provide it."""
    lines = ["the cluster cannot run lmforge: the job would fail at its first import."]
    for f in findings:
        what = []
        if f.missing:
            what.append(f"missing {', '.join(f.missing)}")
        if f.wrong:
            what.append(f"wrong versions: {', '.join(f.wrong)}")
        lines.append(f"  {f.where}: {'; '.join(what) or 'see above'}")
    needed = " ".join(shlex.quote(str(r)) for r in reqs.specs.values())
    lines += [
        "Provide them in one of three ways:",
        "  1. the image: run the cluster on cluster/Dockerfile's image (Ray's image of the "
        "pinned Ray and Python with lmforge installed; docs/clusters.md#the-cluster-image);",
        "  2. the cluster's environment: start Ray from the environment lmforge is installed "
        "in, so its `python` comes first on PATH (`source .venv/bin/activate` before "
        "`ray start`, or `pip install -c constraints.txt .` into the cluster's python);",
        "  3. a runtime_env: lmforge submit ... --runtime-env-json "
        f"'{{\"pip\": [...]}}' with {needed}",
        "  (--no-preflight skips this check)."]
    return "\n".join(lines)


def check(jobs_client: Any, runtime_env: dict[str, Any], reqs: Requirements | None = None,
          timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Run the preflight job on the cluster behind `jobs_client` (a JobSubmissionClient);
    return its report, or raise PreflightError saying what is missing and how to provide
    it. `runtime_env` is the job's, without `working_dir`/`py_modules`."""
    reqs = reqs or Requirements.of_lmforge()
    wanted = {name: reqs.modules.get(name, name) for name in reqs.specs}
    job_id = f"lmforge-preflight-{uuid.uuid4().hex[:8]}"
    when_agent_ready(lambda: jobs_client.submit_job(
        entrypoint=shlex.join(["python", "-c", _CHECK, json.dumps(wanted)]),
        runtime_env=runtime_env, submission_id=job_id,
        metadata={"lmforge.preflight": "1"}))
    deadline = time.monotonic() + timeout_s
    while not (status := jobs_client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            jobs_client.stop_job(job_id)
            raise PreflightError(f"the preflight job {job_id} did not finish within "
                                 f"{timeout_s:.0f} s (status {status}); --no-preflight "
                                 "skips the check")
        time.sleep(0.5)
    logs = jobs_client.get_job_logs(job_id)
    report = next((json.loads(line[len(MARKER):]) for line in logs.splitlines()
                   if line.startswith(MARKER)), None)
    if report is None:
        info = jobs_client.get_job_info(job_id)
        raise PreflightError(
            f"the preflight job {job_id} ended {status} without a report: the cluster could "
            f"not run `python` for the job ({(info.message or '').strip()[:500]})\n"
            f"{logs[-2000:]}")
    findings = judge(report, reqs)
    if findings:
        raise PreflightError(explain(findings, reqs))
    return report
