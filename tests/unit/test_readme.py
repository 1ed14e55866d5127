"""README's configuration tables are generated from the settings classes: they must not drift."""

from __future__ import annotations

from pathlib import Path

from loramerge_common.settings_doc import render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_tables_match_the_settings_classes() -> None:
    text = README.read_text()
    assert render(text) == text, "run `python -m loramerge_common.settings_doc` to refresh README"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
