"""The blocked dense merge equals the whole-tensor strategies, whatever the blocking."""

from __future__ import annotations

import pytest
import torch

from merge_service import kernels, module_merge, strategies
from merge_service.adapter import LoraModule
from merge_service.module_merge import dense_merge, magnitude_threshold, merge_module, row_blocks
from merge_service.spec import SignMethod, Space
from merge_service.strategies import MergeParams


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def parts(n: int = 3, d_out: int = 300, d_in: int = 200, seed: int = 0) -> list[LoraModule]:
    g = torch.Generator().manual_seed(seed)
    ranks = [4, 8, 2, 6][:n]
    return [
        LoraModule(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g), scale=0.5 + i)
        for i, r in enumerate(ranks)
    ]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many blocks and a sampled threshold even on small matrices."""
    monkeypatch.setattr(module_merge, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(module_merge, "THRESHOLD_SAMPLE", 512)


def banded_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Spy on the one-pass banded merge: one entry per call, True when it produced the result."""
    taken: list[bool] = []
    real = module_merge._banded_merge

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(*args, **kwargs)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(module_merge, "_banded_merge", spy)
    return taken


@pytest.mark.parametrize("fused", [True, False], ids=["numba", "torch"])
@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("density", [0.07, 0.5, 1.0])
def test_blocked_merge_equals_whole_tensor_strategy(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch, name: str, density: float, fused: bool
) -> None:
    if fused and not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(kernels, "AVAILABLE", fused)
    ps = parts()
    assert len(row_blocks(300, 200, torch.device("cpu"))) == 60
    strategy = strategies.get(name)
    params = MergeParams(density=density, sign_method=SignMethod.FREQUENCY, seed=3)
    seeds = [11, 12, 13]
    weights = [0.5, -1.0, 2.0]
    merged, total_sq, _ = dense_merge(ps, weights, strategy, params, seeds)
    dense = [(p.B * p.scale) @ p.A for p in ps]
    want = strategy.fn(dense, weights, params, seeds)
    assert torch.equal(merged, want)
    assert total_sq == pytest.approx(float(want.double().square().sum()), rel=1e-7)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_kernel_draws_streams_in_pairs_for_any_adapter_count(small_blocks: None, n: int, name: str) -> None:
    """The kernel draws two adapters' masks in one loop (an odd one alone), each stream in its own order;
    weights that do not scale exactly (0.7) check that the weighted sum rounds w·T before adding."""
    ps = parts(4, seed=9)[:n]
    strategy = strategies.get(name)
    params = MergeParams(density=0.3, sign_method=SignMethod.TOTAL, seed=5)
    seeds, weights = [21, 22, 23, 24][:n], [1.0, -0.5, 0.7, 2.0][:n]
    merged, _, _ = dense_merge(ps, weights, strategy, params, seeds)
    assert torch.equal(merged, strategy.fn([(p.B * p.scale) @ p.A for p in ps], weights, params, seeds))


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_random_prune_on_threads_equals_one_thread(
    small_blocks: None, threads: int, n: int, name: str
) -> None:
    """With two threads or more, workers draw different adapters' masks and combine different rows:
    the merged matrix and the sketch are those of one thread, entry for entry."""
    ps = parts(4, seed=7)[:n]
    strategy = strategies.get(name)
    params = MergeParams(density=0.4, sign_method=SignMethod.TOTAL, seed=2)
    seeds, weights = [31, 32, 33, 34][:n], [0.9, -0.7, 1.3, 0.6][:n]
    omega = torch.randn(200, 7, generator=torch.Generator().manual_seed(1))
    one, one_sq, one_y = dense_merge(ps, weights, strategy, params, seeds, omega=omega)
    calls = []
    real = module_merge._random_blocks_threaded
    torch.set_num_threads(threads)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module_merge, "_random_blocks_threaded", lambda *a: calls.append(a[-1]) or real(*a))
            many, many_sq, many_y = dense_merge(ps, weights, strategy, params, seeds, omega=omega)
    finally:
        torch.set_num_threads(1)
    assert calls == [min(threads, n)]
    assert torch.equal(many, one) and torch.equal(many_y, one_y)
    assert torch.equal(many, strategy.fn([(p.B * p.scale) @ p.A for p in ps], weights, params, seeds))
    assert many_sq == pytest.approx(one_sq, rel=1e-12)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
def test_a_failing_worker_fails_the_merge_without_hanging(small_blocks: None, monkeypatch) -> None:
    real = kernels.random_prune_rows

    def fail_on_third(d, i, *args):  # type: ignore[no-untyped-def]
        if i == 2:
            raise MemoryError("no room for the masks")
        return real(d, i, *args)

    monkeypatch.setattr(kernels, "random_prune_rows", fail_on_third)
    torch.set_num_threads(2)
    with pytest.raises(MemoryError, match="no room"):
        dense_merge(parts(4), [1.0] * 4, strategies.get("dare_ties"), MergeParams(0.5), [1, 2, 3, 4])


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.93])
def test_sampled_threshold_keeps_exactly_k(small_blocks: None, density: float) -> None:
    (p,) = parts(1, seed=4)
    blocks = row_blocks(300, 200, torch.device("cpu"))
    th = magnitude_threshold(p.B * p.scale, p.A, density, seed=1, blocks=blocks)
    mag = ((p.B * p.scale) @ p.A).abs()
    k = int(density * mag.numel())
    assert th is not None and int((mag > th.value).sum()) + th.ties == k
    assert int((mag >= th.value).sum()) >= k


def test_threshold_with_many_ties(small_blocks: None) -> None:
    # rank-1 with a constant column factor: every row is one magnitude, repeated 200 times
    p = LoraModule(A=torch.ones(1, 200), B=torch.arange(300.0).reshape(300, 1), scale=1.0)
    th = magnitude_threshold(p.B, p.A, 0.5, seed=1, blocks=row_blocks(300, 200, torch.device("cpu")))
    assert th is not None and th.value == 150.0 and th.ties == 200
    merged, _, _ = dense_merge([p], [1.0], strategies.get("magnitude_prune"), MergeParams(0.5), [0])
    assert int((merged != 0).sum()) == 30000
    assert torch.equal(merged, strategies.magnitude_prune_tensor(p.B @ p.A, 0.5))


@pytest.mark.parametrize("space", [Space.DELTA, Space.FACTORS])
def test_merge_module_sketch_gives_near_optimal_factors(space: Space) -> None:
    ps = parts(3, d_out=400, d_in=300, seed=5)
    if space == Space.FACTORS:
        ps = [LoraModule(p.A[:2], p.B[:, :2], p.scale) for p in ps]
    strategy = strategies.get("ties")
    params = MergeParams(density=0.3)
    res = merge_module("m", ps, [1.0, 0.5, 0.8], ["x", "y", "z"], strategy, params, space, rank=8)
    assert res.rank <= 8 and res.B.shape[1] == res.A.shape[0] == res.rank
    if space == Space.DELTA:
        dense = strategy.fn([(p.B * p.scale) @ p.A for p in ps], [1.0, 0.5, 0.8], params, [])
        s = torch.linalg.svdvals(dense.double())
        optimum = float((s[8:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        got = float((dense.double() - res.B.double() @ res.A.double()).norm() / dense.double().norm())
        assert got <= optimum * 1.01 and res.relative_error == pytest.approx(got, rel=1e-3)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
def test_kernel_sfc64_is_numpys_stream() -> None:
    import numpy as np

    state = kernels.sfc64_state(987654321)[None, :].copy()
    got = np.empty(1000, dtype=np.uint64)
    kernels.sfc64_raw(state, got)
    assert np.array_equal(got, np.random.SFC64(987654321).random_raw(1000))


@pytest.mark.parametrize("name", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("density", [0.0005, 0.3, 0.9])
@pytest.mark.parametrize("threads", [1, 3])
def test_one_pass_banded_merge_is_taken_and_exact(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch, name: str, density: float, threads: int
) -> None:
    """The one-pass magnitude merge (deferred band entries) runs, equals the strategy, and keeps MΩ;
    with threads, the row groups and the four exact thresholds are shared among workers."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    taken = banded_calls(monkeypatch)
    torch.set_num_threads(threads)
    ps = parts(4, seed=7)
    strategy = strategies.get(name)
    params = MergeParams(density=density)
    weights = [0.5, -1.0, 2.0, 1.0]
    omega = torch.randn(200, 12, generator=torch.Generator().manual_seed(1))
    merged, total_sq, y = dense_merge(ps, weights, strategy, params, [1, 2, 3, 4], omega=omega)
    assert taken == [True]
    want = strategy.fn([(p.B * p.scale) @ p.A for p in ps], weights, params, [1, 2, 3, 4])
    assert torch.equal(merged, want)
    assert total_sq == pytest.approx(float(want.double().square().sum()), rel=1e-6)
    assert y is not None
    torch.testing.assert_close(y, want @ omega, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_banded_merge_spreads_ties_over_row_groups_and_ignores_the_thread_count(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """Rows 5, 35, …, 275 share one magnitude and the threshold falls inside that plateau, so the tie
    quota must be spent in row order across the row groups the worker threads patch independently."""
    taken = banded_calls(monkeypatch)
    b = torch.rand(300, 1, generator=torch.Generator().manual_seed(2))
    plateau = torch.arange(5, 300, 30)
    b[plateau] = 0.5
    p = LoraModule(A=torch.ones(1, 200), B=b, scale=1.0)
    k = int((b > 0.5).sum()) * 200 + 1000  # the first 1000 of the 2000 tied entries
    density = k / 60000 + 1e-9
    strategy = strategies.get("magnitude_prune")
    torch.set_num_threads(threads)
    merged, total_sq, _ = dense_merge([p], [1.0], strategy, MergeParams(density), [0])
    want = strategies.magnitude_prune_tensor(b @ p.A, density)
    assert taken == [True] and len(module_merge.row_blocks(300, 200, torch.device("cpu"))) > 8
    assert torch.equal(merged, want)
    kept_ties = (merged == 0.5).nonzero()[:, 0].unique()
    assert kept_ties.tolist() == plateau[:5].tolist()  # rows 5 … 125: more than one row group
    torch.set_num_threads(1)
    again, again_sq, _ = dense_merge([p], [1.0], strategy, MergeParams(density), [0])
    assert torch.equal(again, merged) and again_sq == total_sq
