"""Factorization: compression of factored products and truncated SVD of dense merges, against torch's
full SVD (the Eckart–Young optimum)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_service.factorize import compress_factors, relative_error, truncate_dense


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: intra-op threads only add contention on a shared machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _optimum(m: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))


def _lowrank(d_out: int, d_in: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, r)
    return torch.randn(d_out, r, generator=g) * decay, torch.randn(r, d_in, generator=g)


@settings(max_examples=20, deadline=None)
@given(r=st.integers(2, 24), k=st.integers(1, 30), seed=st.integers(0, 999))
def test_compress_factors_is_optimal_and_reports_its_error(r: int, k: int, seed: int) -> None:
    B, A = _lowrank(48, 36, r, seed)
    f = compress_factors(B, A, k)
    dense = B @ A
    assert f.rank == min(k, r)
    got = relative_error(dense, f.B, f.A)
    assert got == pytest.approx(_optimum(dense, k), abs=2e-6)
    assert f.relative_error == pytest.approx(got, abs=2e-6)


def test_compress_keeps_everything_when_rank_allows() -> None:
    B, A = _lowrank(20, 30, 6, 1)
    f = compress_factors(B, A, 6)
    assert f.B is B and f.A is A and f.relative_error == 0.0


@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_truncate_dense_full_rank_is_exact_without_svd(shape: tuple[int, int]) -> None:
    m = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    f = truncate_dense(m, 100)
    assert f.rank == min(shape) and f.relative_error == 0.0
    assert torch.equal(f.B @ f.A, m)  # identity factor: bitwise exact


@pytest.mark.parametrize("randomized", [False, True])
def test_truncate_dense_near_optimum(randomized: bool) -> None:
    g = torch.Generator().manual_seed(3)
    # a merged-delta-like matrix: strong low-rank part plus a full-rank pruning residue
    m = torch.randn(600, 16, generator=g) @ torch.randn(16, 400, generator=g) + 0.3 * torch.randn(
        600, 400, generator=g
    )
    k = 16
    f = truncate_dense(m, k, seed=7, randomized=randomized)
    opt = _optimum(m, k)
    got = relative_error(m, f.B, f.A)
    assert f.rank == k
    assert got <= opt * (1.01 if randomized else 1.0 + 1e-5)
    assert f.relative_error == pytest.approx(got, rel=1e-3)


def test_randomized_svd_is_deterministic_for_a_seed() -> None:
    m = torch.randn(300, 200, generator=torch.Generator().manual_seed(4))
    a, b = truncate_dense(m, 8, seed=1, randomized=True), truncate_dense(m, 8, seed=1, randomized=True)
    assert a.B.numpy().tobytes() == b.B.numpy().tobytes() and a.A.numpy().tobytes() == b.A.numpy().tobytes()


def test_singular_values_split_evenly_between_factors() -> None:
    B, A = _lowrank(30, 20, 5, 5)
    f = compress_factors(B, A, 3)
    torch.testing.assert_close(f.B.norm(dim=0), f.A.norm(dim=1), rtol=1e-4, atol=1e-6)
