"""The build-time estimate: pure, monotone in the work, and ordered like the measured strategies."""

from __future__ import annotations

import pytest

from merge_service.estimate import ModuleWork, estimate_build_seconds, module_flops

LLAMA3_8B_LAYER = [
    ModuleWork(4096, 4096, (16,) * 4),
    ModuleWork(1024, 4096, (16,) * 4),
    ModuleWork(1024, 4096, (16,) * 4),
    ModuleWork(4096, 4096, (16,) * 4),
    ModuleWork(14336, 4096, (16,) * 4),
    ModuleWork(14336, 4096, (16,) * 4),
    ModuleWork(4096, 14336, (16,) * 4),
]


def est(layers: int, *, linear: bool, rank: int, factors: bool = False, device: str = "cpu") -> float:
    return estimate_build_seconds(
        LLAMA3_8B_LAYER * layers,
        linear=linear,
        factors=factors,
        rank=rank,
        input_bytes=10_000_000 * layers,
        output_bytes=2_700_000 * layers * rank // 16,
        device=device,
    )


def test_dense_merge_flops_follow_the_formula() -> None:
    m = ModuleWork(1000, 800, (16, 8, 0))
    # d·(2·R + 2·ℓ·(2 + 2q) + 24·n) with R = 24, ℓ = 32, n = 2 present, q = 2 (a small module)
    assert module_flops(m, dense=True, linear=False, factors=False, rank=16) == pytest.approx(
        800_000 * (2 * 24 + 2 * 32 * 6 + 24 * 2)
    )
    big = ModuleWork(4096, 4096, (16, 8, 0))  # from 4096 x 4096 on, q = 1
    assert module_flops(big, dense=True, linear=False, factors=False, rank=16) == pytest.approx(
        4096 * 4096 * (2 * 24 + 2 * 32 * 4 + 24 * 2)
    )
    assert module_flops(m, dense=False, linear=True, factors=False, rank=24) == 0.0
    assert module_flops(m, dense=False, linear=True, factors=False, rank=16) == 2 * 1800 * 24 * 24


def test_estimates_scale_with_layers_and_order_strategies() -> None:
    ties_8, ties_32 = est(8, linear=False, rank=16), est(32, linear=False, rank=16)
    assert ties_32 == pytest.approx(4 * ties_8)
    linear_exact = est(32, linear=True, rank=64)
    assert linear_exact < est(32, linear=True, rank=16) < ties_32
    assert est(32, linear=False, rank=16, device="cuda") < ties_32 / 20
    # calibrated at Llama-3-8B shapes on 2 cores: dense merges take about a minute, linear seconds
    assert 20 < ties_32 < 300 and linear_exact < 20


def test_plan_carries_the_estimate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.bench_scale import TINY, _spec, write_adapters
    from merge_service.pipeline import Merger
    from merge_service.sources import SourceResolver

    write_adapters(tmp_path, 1, TINY)
    merger = Merger(SourceResolver(tmp_path), device="cpu")
    ties = merger.estimate_seconds(merger.plan(_spec("ties", 16)))
    linear = merger.estimate_seconds(merger.plan(_spec("linear", 0)))
    assert 0 < linear < ties < 5
