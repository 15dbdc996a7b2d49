"""The chaos suite's knobs and report: the scale read from the environment, and one row per
scenario appended to the report file (see conftest.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

SCALE_ENV = "LMFORGE_CHAOS_SCALE"
REPORT_ENV = "LMFORGE_CHAOS_REPORT"
COLUMNS = ("scenario", "scale", "load held", "faults injected", "lost", "figures")


def chaos_scale_from_env() -> float:
    """LMFORGE_CHAOS_SCALE as a float > 0 (1 when unset); a clear error otherwise."""
    raw = os.environ.get(SCALE_ENV, "1")
    try:
        scale = float(raw)
    except ValueError:
        raise pytest.UsageError(f"{SCALE_ENV}={raw!r}: not a number") from None
    if not scale > 0:
        raise pytest.UsageError(f"{SCALE_ENV}={raw!r}: must be > 0")
    return scale


ChaosResult = Callable[..., dict]


def write_row(path: Path, row: dict) -> None:
    """Append one scenario's row to the report: markdown table rows for `.md` (the header
    when the file is new or empty), a JSON line otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".md":
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return
    new = not path.exists() or path.stat().st_size == 0
    figures = ", ".join(f"{k} {v}" for k, v in row["figures"].items())
    cells = [row["scenario"], f"{row['scale']:g}", row["load"], row["faults"], row["lost"],
             figures]
    with path.open("a") as f:
        if new:
            f.write("| " + " | ".join(COLUMNS) + " |\n")
            f.write("|" + " --- |" * len(COLUMNS) + "\n")
        f.write("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")


