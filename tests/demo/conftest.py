"""Demo fixtures: the small demo assets, built once (and cached across runs by their hash)."""

from __future__ import annotations

import pytest

from demo.assets import DemoAssets, ensure_assets


@pytest.fixture(scope="session")
def demo_small() -> DemoAssets:
    return ensure_assets("small")
