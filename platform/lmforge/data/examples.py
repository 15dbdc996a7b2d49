"""Offline instruction and chat sets built from text that ships with Python, so a
fine-tuning job and its tests need no network (`lmforge data-examples pydoc-qa OUT.jsonl`).

`pydoc_qa`: every section of Python's documentation topics (`pydoc_data.topics`, the text
behind `help("assert")`; ~200 sections under ~80 topics) becomes a few questions (fixed
phrasings) answered by the section's opening text, cut at a word boundary to at most
`max_chars`. The same Python gives the same records, in the same order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

QUESTIONS = (
    "What does the Python documentation say about {title}?",
    "Explain {title} in Python.",
    "Describe {title}.",
)
"""The phrasings every section is asked in: the answers are the same text, so a model
learns to answer the topic, not one phrasing."""

_HEADING = re.compile(r"^(\S[^\n]*)\n([*=\-~^])\2+\n", re.M)


def pydoc_sections() -> list[tuple[str, str]]:
    """(title, text) of every titled section of Python's documentation topics, in topic
    order; a topic without headings is one section named after its key."""
    from pydoc_data.topics import topics

    out: list[tuple[str, str]] = []
    for key in sorted(topics):
        text = topics[key]
        heads = [m for m in _HEADING.finditer(text) if len(m.group(0).split("\n")[1])
                 == len(m.group(1))]
        if not heads:
            out.append((key, text.strip()))
            continue
        for i, m in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            body = text[m.end():end].strip()
            if body:
                out.append((m.group(1).strip(), body))
    return out


def clip(text: str, max_chars: int) -> str:
    """`text` whole when it fits, else cut at the last space within `max_chars`, + "..."."""
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars - 3)
    return text[:cut if cut > 0 else max_chars - 3].rstrip() + "..."


def pydoc_qa(max_chars: int = 300, fmt: Literal["instruction", "chat"] = "instruction",
             questions: int = len(QUESTIONS)) -> list[dict[str, Any]]:
    """Question-answer records about Python's documentation: `instruction` records
    (instruction, output) or `chat` records (OpenAI `messages`). `questions` phrasings per
    section (1 to 3)."""
    if not 1 <= questions <= len(QUESTIONS):
        raise ValueError(f"questions: 1 to {len(QUESTIONS)}, not {questions}")
    if max_chars < 20:
        raise ValueError(f"max_chars: at least 20, not {max_chars}")
    records: list[dict[str, Any]] = []
    for title, body in pydoc_sections():
        answer = clip(body, max_chars)
        title = "the" + title[3:] if title.startswith("The ") else title
        for phrasing in QUESTIONS[:questions]:
            question = phrasing.format(title=title)
            if fmt == "instruction":
                records.append({"instruction": question, "output": answer})
            else:
                records.append({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]})
    return records


def write_jsonl(records: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")


SETS = {"pydoc-qa": pydoc_qa}
"""The sets `lmforge data-examples` builds, by name."""
