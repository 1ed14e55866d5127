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


@pytest.fixture(scope="session")
def hardened_stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, adapter_root: Path):
    """Merge service (mTLS, bearer token, disk cache, small request limits) and inference service (TLS,
    bearer token, at most 3 adapters loaded) as processes, joined through a steerable TCP proxy over
    mutual TLS; see tests/faults/stack.py. Tests marked ``stops_a_service`` run last."""
    from tests.faults.stack import Stack, default_limits, stack_adapter_root

    root = tmp_path_factory.mktemp("hardened-stack")
    adapters = stack_adapter_root(adapter_root, root / "adapters", tiny_llama)
    stack = Stack.start(root, tiny_llama, adapters, limits=default_limits(adapter_root))
    try:
        yield stack
    finally:
        stack.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stops_a_service: stops a session-scoped service (hardened_stack's or the e2e inference service); "
        "runs after every other test",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("stops_a_service") is not None)
