"""The chaos suite's frame: its scale from the environment and its report rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.chaos.report import SCALE_ENV, chaos_scale_from_env, write_row

ROW = {"scenario": "overload", "test": "t", "scale": 1.0, "load": "32 clients",
       "faults": "3x capacity", "lost": "0 requests", "figures": {"p50_s": 0.25, "n": 40},
       "at": "2026-12-03T08:00:00Z"}


def test_scale_defaults_to_one_and_reads_the_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(SCALE_ENV, raising=False)
    assert chaos_scale_from_env() == 1.0
    monkeypatch.setenv(SCALE_ENV, "6")
    assert chaos_scale_from_env() == 6.0


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "nan"])
def test_bad_scale_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str):
    monkeypatch.setenv(SCALE_ENV, raw)
    with pytest.raises(pytest.UsageError, match=SCALE_ENV):
        chaos_scale_from_env()


def test_markdown_report_gets_a_header_once_then_rows(tmp_path: Path):
    report = tmp_path / "out" / "chaos.md"
    write_row(report, ROW)
    write_row(report, {**ROW, "scenario": "a|b"})
    lines = report.read_text().splitlines()
    assert lines[0].startswith("| scenario | scale | load held | faults injected | lost |")
    assert len(lines) == 4 and lines[2].startswith("| overload | 1 | 32 clients |")
    assert "p50_s 0.25, n 40" in lines[2] and "a\\|b" in lines[3]


def test_other_report_files_get_json_lines(tmp_path: Path):
    report = tmp_path / "chaos.jsonl"
    write_row(report, ROW)
    write_row(report, ROW)
    assert [json.loads(line) for line in report.read_text().splitlines()] == [ROW, ROW]
