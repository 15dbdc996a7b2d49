"""The submit preflight's check: the script the cluster's python runs (here, run by this
machine's interpreters, without Ray), and how its report is judged and explained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lmforge.preflight import _CHECK, MARKER, Requirements, explain, judge

REQS = Requirements({"typer": Requirement("typer>=0.16"), "pyyaml": Requirement("pyyaml>=6.0"),
                     "numpy": Requirement("numpy>=99")}, {"pyyaml": "yaml"})


def run_check(python: str, wanted: dict[str, str]) -> dict:
    out = subprocess.run([python, "-c", _CHECK, json.dumps(wanted)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith(MARKER)]
    return json.loads(line[len(MARKER):])


def test_lmforges_requirements_map_to_their_modules():
    reqs = Requirements.of_lmforge()
    assert {"ray", "torch", "typer", "pyyaml"} <= set(reqs.specs)
    assert "pytest" not in reqs.specs  # dev extras are not needed on the cluster
    assert reqs.modules["pyyaml"] == "yaml" and reqs.modules["typer"] == "typer"


def test_check_script_reports_versions_in_this_python():
    report = run_check(sys.executable, {"typer": "typer", "pyyaml": "yaml", "numpy": "numpy"})
    found = report["driver"]["found"]
    assert found["typer"] and found["pyyaml"] and found["numpy"]
    assert report["driver"]["python"] == sys.executable and report["nodes"] == []
    # numpy is there but too old for the (made-up) requirement; nothing is missing.
    (finding,) = judge(report, REQS)
    assert finding.missing == [] and finding.wrong == [f"numpy {found['numpy']} (needs >=99)"]


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
def test_a_python_without_lmforges_dependencies_is_named_with_the_ways_to_fix_it():
    # The case: the job's `python` is the system one, not the venv's.
    bare = "/usr/bin/python3"
    if subprocess.run([bare, "-c", "import typer"], capture_output=True).returncode == 0:
        pytest.skip("the system python has typer")
    report = run_check(bare, {"typer": "typer", "pyyaml": "yaml", "numpy": "numpy"})
    findings = judge(report, REQS)
    assert findings and "typer" in findings[0].missing
    assert findings[0].where.startswith(f"the job's `python` ({shutil.which(bare) or bare}")
    msg = explain(findings, REQS)
    assert "missing typer" in msg
    for way in ("cluster/Dockerfile", "ray start", "--runtime-env-json", "'typer>=0.16'"):
        assert way in msg, way


def test_every_node_is_judged_and_a_failed_node_check_is_reported():
    ok = {"python": "/venv/bin/python", "version": "3.11.9",
          "found": {"typer": "0.16.0", "pyyaml": "6.0.2", "numpy": "99.1"}}
    report = {"driver": ok, "nodes": [
        dict(ok, ip="10.0.0.5"),
        dict(ok, ip="10.0.0.6", found={"typer": None, "pyyaml": "5.4", "numpy": "99.1"}),
        {"ip": "10.0.0.7", "error": "GetTimeoutError: timed out"}]}
    findings = judge(report, REQS)
    assert [f.where.split(" (")[0] for f in findings] == [
        "the Ray workers on node 10.0.0.6", "the Ray workers on node 10.0.0.7"]
    assert findings[0].missing == ["typer"] and findings[0].wrong == ["pyyaml 5.4 (needs >=6.0)"]
    assert "GetTimeoutError" in findings[1].where
    assert judge({"driver": ok, "nodes": [dict(ok, ip="10.0.0.5")]}, REQS) == []
