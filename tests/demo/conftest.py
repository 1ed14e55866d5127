"""Demo fixtures: the small demo assets, built once (and cached across runs by their hash)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.assets import DemoAssets
from demo.cache import ensure_assets


@pytest.fixture(scope="session")
def demo_small() -> DemoAssets:
    return ensure_assets("small")


def assert_real_chart(path: Path, rows: int) -> None:
    """A PNG of sensible size with many distinct colours (not a blank canvas)."""
    import matplotlib.image as mpimg
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= 400 and h >= 100 + 10 * rows
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50


@pytest.fixture
def chart_check() -> Callable[[Path, int], None]:
    return assert_real_chart


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; two spin-wait badly on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
