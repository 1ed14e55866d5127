"""A short sustained-load run (the CI version of `make load`) on the hardened stack.

Several clients mix base requests with more distinct merged specs than the inference service keeps
loaded, for about 20 s: every request must succeed, the merge service must build each spec exactly
once (evicted adapters come back from its cache), and eviction must keep the adapter directory
bounded and free of leftovers.
"""

from __future__ import annotations

import pytest

from benchmarks.load import LoadConfig, run_load
from tests.faults.stack import MAX_LOADED_ADAPTERS, Stack

pytestmark = pytest.mark.e2e

CLIENTS = 6


def test_short_sustained_load(hardened_stack: Stack) -> None:
    stack = hardened_stack
    cfg = LoadConfig(seconds=20, clients=CLIENTS, specs=MAX_LOADED_ADAPTERS + 3, base_fraction=0.3)
    result = run_load(stack, cfg)
    print("\n" + result.markdown())

    assert result.error_count == 0, result.errors
    assert result.requests >= 2 * CLIENTS
    assert "base" in result.latency_ms and "merged, loaded" in result.latency_ms

    # Each distinct spec was merged exactly once, although evicted adapters were fetched again.
    assert result.distinct_specs == cfg.specs
    assert result.builds_per_spec == {k: 1 for k in result.builds_per_spec}
    assert result.builds_total == cfg.specs
    assert result.evictions > 0 and result.merge_fetches > cfg.specs

    # Bounded: at most the loaded adapters plus one being fetched per client (2 files each, plus
    # the zero adapter's 2): adapters in use are never evicted, so the registry may go above
    # max_loaded while every loaded one is in use, and releasing them brings it back. At the end only
    # the listed adapters' files are left.
    assert result.max_loaded == MAX_LOADED_ADAPTERS
    assert result.adapter_files_peak <= 2 * (MAX_LOADED_ADAPTERS + CLIENTS) + 2
    assert result.adapters_loaded_final <= MAX_LOADED_ADAPTERS
    assert result.adapter_files_final == 2 * result.adapters_loaded_final + 2
    assert stack.adapter_folders() and len(stack.adapter_folders()) == result.adapters_loaded_final

    assert result.peak_rss_merge_mib > 0 and result.peak_rss_inference_mib > 0
    assert stack.serving()
