"""README's spec reference is generated from config.py; stale tables fail here."""

from pathlib import Path

from lmforge.config import JobSpec, with_spec_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_spec_reference_is_current():
    text = README.read_text()
    assert text == with_spec_reference(text), "README spec reference is stale: run `make docs`"


def test_every_spec_field_is_documented():
    text = README.read_text()
    for section, field in JobSpec.model_fields.items():
        for name, f in field.annotation.model_fields.items():
            assert f"`{section}.{name}`" in text
            assert f.description, f"{section}.{name} has no docstring"
