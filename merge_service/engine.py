"""Merge one module of several adapters into one pair of LoRA factors, in either space.

Adapter i contributes, for module m, A_i (r_i, d_in), B_i (d_out, r_i) and its own scale s_i, so its
task vector is ΔW_i = s_i·B_i·A_i. An adapter without the module contributes zero.

- delta space, linear: B = [w_1 s_1 B_1 … w_n s_n B_n], A = [A_1; …; A_n] is exactly Σ w_i ΔW_i at
  rank Σ r_i; a smaller rank compresses it (QR + small SVD, ``factorize.compress_factors``).
- delta space, other strategies: the dense ΔW_i are merged by the strategy and factored back to the
  requested rank (truncated SVD, ``factorize.truncate_dense``); the error is reported per module.
- factors space (as LoRAX does): B' = strategy(s_i·B_i), A' = strategy(A_i) with the same weights;
  needs equal ranks. (Σ w B)(Σ w A) has cross terms and scales one adapter by w², so its reported
  error is the distance from the exact weighted sum Σ w_i ΔW_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_service.factorize import Factors, compress_factors, truncate_dense
from merge_service.spec import Space
from merge_service.strategies import MergeParams, StrategyDef, tensor_seed


@dataclass(frozen=True)
class Part:
    """One adapter's factors for a module: ΔW = scale·B·A."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float


@dataclass(frozen=True)
class ModuleResult:
    B: torch.Tensor  # (d_out, rank)
    A: torch.Tensor  # (rank, d_in)
    rank: int
    relative_error: float


def delta_dense(part: Part) -> torch.Tensor:
    """ΔW = s·B·A as a dense float32 matrix."""
    return (part.B * part.scale) @ part.A


def linear_factors(parts: Sequence[Part], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank concatenation: B = [w_i s_i B_i], A = [A_i] so that B·A = Σ w_i s_i B_i A_i exactly."""
    B = torch.cat([p.B * (w * p.scale) for p, w in zip(parts, weights, strict=True)], dim=1)
    A = torch.cat([p.A for p in parts], dim=0)
    return B, A


def factored_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F without forming B·A: sqrt(trace((BᵀB)(AAᵀ))), in float64."""
    b, a = B.double(), A.double()
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def _present(
    parts: Sequence[Part | None], weights: Sequence[float], keys: Sequence[str]
) -> tuple[list[Part], list[float], list[str]]:
    kept = [(p, w, k) for p, w, k in zip(parts, weights, keys, strict=True) if p is not None]
    return [p for p, _, _ in kept], [w for _, w, _ in kept], [k for _, _, k in kept]


def merge_module(
    module: str,
    parts: Sequence[Part | None],
    weights: Sequence[float],
    keys: Sequence[str],
    strategy: StrategyDef,
    params: MergeParams,
    space: Space,
    rank: int,
) -> ModuleResult:
    """Merge one module. ``parts[i]`` is adapter i's factors (None when it lacks the module), ``keys[i]``
    a stable label for adapter i (content digest) that seeds its random masks; ``rank`` is the largest
    rank the result may have. All tensors must be on one device; results stay on it."""
    present, w, k = _present(parts, weights, keys)
    if not present:
        raise ValueError(f"module {module!r}: no adapter has it")
    if space == Space.FACTORS:
        return _merge_factors(module, present, w, k, strategy, params, rank)
    if strategy.linear:
        B, A = linear_factors(present, w)
        f = compress_factors(B, A, rank)
        return ModuleResult(f.B, f.A, f.rank, f.relative_error)
    dense = [delta_dense(p) for p in present]
    seeds = [tensor_seed(params.seed, module, key, "delta") for key in k]
    merged = strategy.fn(dense, w, params, seeds)
    del dense
    f = truncate_dense(merged, rank, seed=tensor_seed(0, module, "svd"))
    return ModuleResult(f.B, f.A, f.rank, f.relative_error)


def _merge_factors(
    module: str,
    parts: Sequence[Part],
    weights: Sequence[float],
    keys: Sequence[str],
    strategy: StrategyDef,
    params: MergeParams,
    rank: int,
) -> ModuleResult:
    ranks = {p.A.shape[0] for p in parts}
    if len(ranks) != 1:
        raise ValueError(f"module {module!r}: factors space needs equal ranks, got {sorted(ranks)}")
    seeds_b = [tensor_seed(params.seed, module, key, "B") for key in keys]
    seeds_a = [tensor_seed(params.seed, module, key, "A") for key in keys]
    B = strategy.fn([p.B * p.scale for p in parts], weights, params, seeds_b)
    A = strategy.fn([p.A for p in parts], weights, params, seeds_a)
    f = compress_factors(B, A, rank)
    # Distance from the exact weighted sum: ‖B'A' − Σ w_i s_i B_i A_i‖ as one factored product.
    exact_b, exact_a = linear_factors(parts, weights)
    ref = factored_norm(exact_b, exact_a)
    diff = factored_norm(torch.cat([f.B, -exact_b], dim=1), torch.cat([f.A, exact_a], dim=0))
    err = diff / ref if ref > 0 else 0.0
    return ModuleResult(f.B, f.A, f.rank, err)


def pad_rank(result: ModuleResult | Factors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad B (d_out, r) and A (r, d_in) to ``rank`` columns/rows: PEFT and vLLM want one rank."""
    B, A = result.B, result.A
    r = A.shape[0]
    if r == rank:
        return B, A
    if r > rank:
        raise ValueError(f"factors of rank {r} exceed the output rank {rank}")
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
    A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0)
    return B, A
