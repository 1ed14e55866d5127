"""Interference statistics from factors, checked against dense ΔW computations."""

from __future__ import annotations

import math

import pytest
import torch

from merge_service.adapter import LoraModule
from merge_service.interference import (
    factor_inner,
    factor_norm_sq,
    interference,
    module_pair,
    sample_rows,
    sign_counts,
    to_proto,
)


def rand_factors(d_out: int, d_in: int, r: int, seed: int, scale: float = 0.7) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale)


def dense(f: LoraModule) -> torch.Tensor:
    return f.scale * (f.B.double() @ f.A.double())


def dense_sign_counts(d1: torch.Tensor, d2: torch.Tensor, density: float) -> tuple[int, int, int]:
    v1, v2 = d1.flatten(), d2.flatten()
    k = max(1, math.floor(density * v1.numel()))
    t1 = set(torch.topk(v1.abs(), k).indices.tolist())
    t2 = set(torch.topk(v2.abs(), k).indices.tolist())
    both = t1 & t2
    conflicts = sum(1 for e in both if float(v1[e]) * float(v2[e]) < 0)
    return len(both), len(t1 | t2), conflicts


def test_inner_and_norm_match_dense() -> None:
    f1, f2 = rand_factors(24, 40, 4, 1), rand_factors(24, 40, 6, 2, scale=-1.3)
    d1, d2 = dense(f1), dense(f2)
    assert factor_inner(f1, f2) == pytest.approx(float((d1 * d2).sum()), rel=1e-9)
    assert factor_norm_sq(f1) == pytest.approx(float((d1 * d1).sum()), rel=1e-9)
    cos = float((d1 * d2).sum() / (d1.norm() * d2.norm()))
    s = module_pair(f1, f2, 24, 40, 0.3, 10**9)
    assert s.cosine == pytest.approx(cos, rel=1e-9)
    assert s.norm_ratio == pytest.approx(float(d1.norm() / d2.norm()), rel=1e-9)


def test_sign_conflicts_match_dense_when_the_sample_is_everything() -> None:
    f1, f2 = rand_factors(16, 12, 3, 3), rand_factors(16, 12, 3, 4)
    s = module_pair(f1, f2, 16, 12, 0.25, 16 * 12)
    overlap, union, conflicts = dense_sign_counts(dense(f1), dense(f2), 0.25)
    assert (s.overlap, s.union, s.conflicts) == (overlap, union, conflicts)
    assert s.sign_conflict == pytest.approx(conflicts / overlap)
    assert s.top_overlap == pytest.approx(overlap / union)


def test_identical_and_opposite_adapters() -> None:
    f = rand_factors(8, 8, 2, 5)
    same = module_pair(f, f, 8, 8, 0.5, 64)
    assert same.cosine == pytest.approx(1.0) and same.sign_conflict == 0.0 and same.top_overlap == 1.0
    neg = module_pair(f, LoraModule(f.A, f.B, -f.scale), 8, 8, 0.5, 64)
    assert neg.cosine == pytest.approx(-1.0) and neg.sign_conflict == 1.0


def test_sampling_is_bounded_and_deterministic() -> None:
    rows = sample_rows(4096, 1024, 1 << 14)
    assert len(rows) == 16 and rows[0] == 0 and rows[-1] == 4095
    assert torch.equal(rows, sample_rows(4096, 1024, 1 << 14))
    assert len(sample_rows(10, 10, 1000)) == 10
    assert len(sample_rows(10, 5000, 100)) == 1


def test_sign_counts_on_a_vector() -> None:
    v1 = torch.tensor([5.0, -4.0, 0.1, 3.0])
    v2 = torch.tensor([6.0, 4.0, 0.2, -0.1])
    assert sign_counts(v1, v2, 0.5) == (2, 2, 1)  # top sets {0, 1} and {0, 1}; entry 1 disagrees


def test_overall_pools_modules_and_a_missing_module_counts_as_zero() -> None:
    a = {"q": rand_factors(8, 6, 2, 6), "v": rand_factors(8, 6, 2, 7)}
    b = {"q": rand_factors(8, 6, 2, 8)}
    res = interference([a, b], density=0.5)
    (pair,) = res.pairs
    assert pair.modules["v"].cosine == 0.0 and pair.modules["v"].overlap == 0
    da = torch.cat([dense(a["q"]).flatten(), dense(a["v"]).flatten()])
    db = torch.cat([dense(b["q"]).flatten(), torch.zeros(48, dtype=torch.float64)])
    assert pair.overall.cosine == pytest.approx(float(da @ db / (da.norm() * db.norm())), rel=1e-9)
    assert res.adapter_norms[0] == pytest.approx(float(da.norm()), rel=1e-9)
    msg = to_proto(res)
    assert msg.pairs[0].overall.cosine == pytest.approx(pair.overall.cosine)
    assert [m.module for m in msg.pairs[0].modules] == ["q", "v"]


def test_three_adapters_give_three_pairs() -> None:
    ads = [{"q": rand_factors(8, 6, 2, s)} for s in range(3)]
    assert [(p.first, p.second) for p in interference(ads).pairs] == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError):
        interference(ads, density=0.0)


def test_fast_at_8b_shapes() -> None:
    """One Llama-3-8B layer's MLP shapes at rank 16: well under a second per module pair."""
    import time

    f1, f2 = rand_factors(14336, 4096, 16, 9), rand_factors(14336, 4096, 16, 10)
    t0 = time.perf_counter()
    module_pair(f1, f2, 14336, 4096, 0.2, 1 << 16)
    assert time.perf_counter() - t0 < 1.0
