"""The docs: docs/reference.md's spec reference is generated from config.py (stale tables
fail here), and no relative Markdown link in the README, docs/ or bench/README.md is dead."""

import re
from pathlib import Path
from urllib.parse import unquote

from lmforge.config import JobSpec, with_spec_reference

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"
LINKED_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
               ROOT / "bench" / "README.md"]
# [text](target) or [text](target "title"); images too. Code spans and fences are dropped
# first, so `a[i](x)` in code is not a link.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def test_spec_reference_is_current():
    text = REFERENCE.read_text()
    assert text == with_spec_reference(text), (
        "docs/reference.md spec reference is stale: run `make docs`")


def test_every_spec_field_is_documented():
    text = REFERENCE.read_text()
    for section, field in JobSpec.model_fields.items():
        for name, f in field.annotation.model_fields.items():
            assert f"`{section}.{name}`" in text
            assert f.description, f"{section}.{name} has no docstring"


def relative_links(path: Path) -> list[str]:
    """The relative link targets in one Markdown file, without their #anchors."""
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto: ...; an anchor within the same page
        targets.append(unquote(target.split("#", 1)[0]))
    return targets


def test_relative_links_resolve():
    # Not vacuous: the README links the docs pages, so the link pattern must find them.
    assert {"docs/reference.md", "docs/testing.md"} <= set(relative_links(ROOT / "README.md"))
    dead = [f"{path.relative_to(ROOT)}: {target}"
            for path in LINKED_DOCS for target in relative_links(path)
            if not (path.parent / target).exists()
            or not (path.parent / target).resolve().is_relative_to(ROOT)]
    assert not dead, "dead relative links (or links out of the repository):\n" + "\n".join(dead)

