"""`lmforge data-examples pydoc-qa`: an instruction/chat set from Python's own docs that a
fine-tuning job can use offline, the same every time, and valid for the data stage."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data import chat
from lmforge.data.examples import pydoc_qa, pydoc_sections


def test_pydoc_qa_is_deterministic_and_bounded():
    first, again = pydoc_qa(max_chars=120), pydoc_qa(max_chars=120)
    assert first == again
    assert len(first) == 3 * len(pydoc_sections()) > 300
    assert all(len(r["output"]) <= 120 for r in first)
    assert first[0]["instruction"] == ('What does the Python documentation say about the '
                                       '"assert" statement?')
    assert first[0]["output"].startswith("Assert statements are a convenient way")
    for record in first:  # every record is a valid example of its format
        assert chat.to_messages(record, "instruction")[-1]["role"] == "assistant"


def test_the_cli_writes_chat_records(tmp_path):
    out = tmp_path / "qa.jsonl"
    result = CliRunner().invoke(app, ["data-examples", "pydoc-qa", str(out), "--format",
                                      "chat", "--questions", "1", "--max-chars", "200"])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"records": len(lines),
                                                                 "path": str(out)}
    for line in lines:
        messages = chat.to_messages(json.loads(line), "chat")
        assert [m["role"] for m in messages] == ["user", "assistant"]
    bad = CliRunner().invoke(app, ["data-examples", "nope", str(out)])
    assert bad.exit_code == 2 and "pydoc-qa" in bad.output
