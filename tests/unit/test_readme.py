"""README's configuration tables are generated from the settings classes: they must not drift."""

from __future__ import annotations

from pathlib import Path

from inference_service.settings import ENV_PREFIX as INFERENCE_PREFIX
from inference_service.settings import InferenceSettings
from loramerge_common.settings_doc import render
from merge_service.settings import ENV_PREFIX as MERGE_PREFIX
from merge_service.settings import MergeSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_tables_match_the_settings_classes() -> None:
    text = README.read_text()
    settings = {"merge": (MergeSettings, MERGE_PREFIX), "inference": (InferenceSettings, INFERENCE_PREFIX)}
    assert render(text, settings) == text, "run `make readme-settings` to refresh README"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
