"""Shared pytest fixtures. Each part appends its own; see tests/factories.py for the tiny model ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import make_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 128, 2 layers, head_dim 32) with a local byte-level BPE tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """Adapters for ``tiny_llama``: a (r8 α16), b (r4 α8), c (r8 α16 rsLoRA), e (r8 α32),
    d (r8 α16, base model "other/base-model")."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "a", tiny_llama, r=8, alpha=16, seed=1)
    make_adapter(root / "b", tiny_llama, r=4, alpha=8, seed=2)
    make_adapter(root / "c", tiny_llama, r=8, alpha=16, use_rslora=True, seed=3)
    make_adapter(root / "e", tiny_llama, r=8, alpha=32, seed=5)
    make_adapter(root / "d", tiny_llama, r=8, alpha=16, seed=4, base_model_name="other/base-model")
    return root
