"""Interference between LoRA adapters, before merging: how much their task vectors overlap and disagree.

For adapters i, j and a module m with ΔW_i = w_i s_i B_i A_i (weight w_i, scale s_i, A_i (r_i × d_in),
B_i (d_out × r_i)):

- cosine similarity cos(ΔW_i, ΔW_j) = ⟨ΔW_i, ΔW_j⟩_F / (‖ΔW_i‖_F ‖ΔW_j‖_F), computed from the factors
  alone: ⟨B_i A_i, B_j A_j⟩_F = tr((B_iᵀ B_j)(A_j A_iᵀ)) and ‖B A‖_F² = tr((BᵀB)(A Aᵀ)), which costs
  O((d_out + d_in) r_i r_j), never a d_out × d_in matrix. Overall figures treat each adapter's task
  vector as the concatenation of its modules (sums of inner products and squared norms).
- norm ratio ‖ΔW_i‖_F / ‖ΔW_j‖_F: which adapter dominates a linear merge.
- sign conflict: TIES keeps each adapter's top-density entries by magnitude and then drops the entries
  whose sign disagrees with the majority. That needs entries, so it is estimated on a bounded,
  deterministic sample of rows of ΔW (at most ``max_entries`` entries per module, rows evenly spaced),
  reconstructed from the factors as w s B[rows] A. Within the sample, each adapter's top
  floor(density · n) entries by |value| form its top set T_i; the overlap is |T_i ∩ T_j| / |T_i ∪ T_j|
  and the sign-conflict rate is the fraction of T_i ∩ T_j where sign(ΔW_i) ≠ sign(ΔW_j).

Weights are included, so a negative weight flips the cosine and the signs, as it does in the merge.
Modules present in only one adapter have cosine 0 (the other contributes zero) and no overlap.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loramerge.v1 import merge_pb2
from merge_service.adapter import LoraModule, load_adapter
from merge_service.pipeline import Plan
from merge_service.threads import intra_op_threads

DEFAULT_DENSITY = 0.2  # TIES's recommended density, used when the spec sets none
DEFAULT_MAX_ENTRIES = 1 << 15  # sampled entries per module for the sign statistics


@dataclass(frozen=True)
class PairStats:
    """Interference of one adapter pair over one module (or overall)."""

    inner: float  # ⟨ΔW_i, ΔW_j⟩_F
    norm_sq_first: float  # ‖ΔW_i‖_F²
    norm_sq_second: float  # ‖ΔW_j‖_F²
    overlap: int  # |T_i ∩ T_j| in the sample
    union: int  # |T_i ∪ T_j| in the sample
    conflicts: int  # entries of T_i ∩ T_j with opposite signs

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.norm_sq_first * self.norm_sq_second)
        return self.inner / denom if denom > 0 else 0.0

    @property
    def norm_ratio(self) -> float:
        if self.norm_sq_second == 0:
            return math.inf if self.norm_sq_first > 0 else 1.0
        return math.sqrt(self.norm_sq_first / self.norm_sq_second)

    @property
    def sign_conflict(self) -> float:
        return self.conflicts / self.overlap if self.overlap else 0.0

    @property
    def top_overlap(self) -> float:
        return self.overlap / self.union if self.union else 0.0

    def __add__(self, other: PairStats) -> PairStats:
        return PairStats(
            self.inner + other.inner,
            self.norm_sq_first + other.norm_sq_first,
            self.norm_sq_second + other.norm_sq_second,
            self.overlap + other.overlap,
            self.union + other.union,
            self.conflicts + other.conflicts,
        )


ZERO = PairStats(0.0, 0.0, 0.0, 0, 0, 0)


@dataclass(frozen=True)
class PairReport:
    first: int  # index into the adapters
    second: int
    overall: PairStats
    modules: dict[str, PairStats]


@dataclass(frozen=True)
class InterferenceResult:
    adapter_norms: tuple[float, ...]  # ‖ΔW_i‖_F over all modules, weights included
    pairs: tuple[PairReport, ...]
    density: float
    max_entries: int
    seconds: float


def factor_inner(f1: LoraModule, f2: LoraModule) -> float:
    """⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁ s₂ tr((B₁ᵀB₂)(A₂A₁ᵀ)), in O((d_out + d_in) r₁ r₂), in float64."""
    gb = f1.B.double().T @ f2.B.double()  # (r1, r2)
    ga = f2.A.double() @ f1.A.double().T  # (r2, r1)
    return f1.scale * f2.scale * float(torch.trace(gb @ ga))


def factor_norm_sq(f: LoraModule) -> float:
    """‖sBA‖_F² = s² tr((BᵀB)(AAᵀ)), in float64."""
    return factor_inner(f, f)


def sample_rows(d_out: int, d_in: int, max_entries: int) -> torch.Tensor:
    """Evenly spaced row indices, at most ``max(1, max_entries // d_in)`` of them (all rows if they fit)."""
    n = max(1, min(d_out, max_entries // max(d_in, 1)))
    if n == d_out:
        return torch.arange(d_out)
    return torch.linspace(0, d_out - 1, n).round().long().unique()


def sampled_rows(f: LoraModule, rows: torch.Tensor) -> torch.Tensor:
    """ΔW[rows] = s · B[rows] @ A: the sampled rows of the dense update, flattened."""
    return (f.scale * (f.B[rows] @ f.A)).flatten()


def top_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the top floor(density · n) entries by |value| (at least one when n > 0)."""
    n = values.numel()
    k = min(n, max(1, math.floor(density * n))) if n else 0
    mask = np.zeros(n, dtype=bool)
    if k:  # numpy's introselect: a few times faster than torch.topk on CPU for large k
        mask[np.argpartition(values.abs().numpy(), n - k)[n - k :]] = True
    return torch.from_numpy(mask)


def sign_counts(v1: torch.Tensor, v2: torch.Tensor, density: float) -> tuple[int, int, int]:
    """(|T₁ ∩ T₂|, |T₁ ∪ T₂|, #{e ∈ T₁ ∩ T₂ : sign v₁[e] ≠ sign v₂[e]}) for the top-density sets T."""
    m1, m2 = top_mask(v1, density), top_mask(v2, density)
    both = m1 & m2
    conflicts = int(((torch.sign(v1) * torch.sign(v2)) < 0)[both].sum())
    return int(both.sum()), int((m1 | m2).sum()), conflicts


def module_pair(
    f1: LoraModule | None,
    f2: LoraModule | None,
    d_out: int,
    d_in: int,
    density: float,
    max_entries: int,
) -> PairStats:
    """All statistics of one pair on one module; a missing side (None) is a zero update."""
    n1 = factor_norm_sq(f1) if f1 is not None else 0.0
    n2 = factor_norm_sq(f2) if f2 is not None else 0.0
    if f1 is None or f2 is None:
        return PairStats(0.0, n1, n2, 0, 0, 0)
    rows = sample_rows(d_out, d_in, max_entries)
    overlap, union, conflicts = sign_counts(sampled_rows(f1, rows), sampled_rows(f2, rows), density)
    return PairStats(factor_inner(f1, f2), n1, n2, overlap, union, conflicts)


def interference(
    adapters: Sequence[dict[str, LoraModule]],
    *,
    density: float = DEFAULT_DENSITY,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> InterferenceResult:
    """Interference of every pair of ``adapters`` (each a module name → factors map, weights folded into
    the scales), per module (the union of modules) and overall."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    t0 = time.perf_counter()
    names = sorted(set().union(*adapters)) if adapters else []
    shapes: dict[str, tuple[int, int]] = {}
    for a in adapters:
        for name, f in a.items():
            shapes.setdefault(name, (f.B.shape[0], f.A.shape[1]))
    norms = tuple(math.sqrt(sum(factor_norm_sq(f) for f in a.values())) for a in adapters)
    pairs = []
    with torch.no_grad():
        for i, j in itertools.combinations(range(len(adapters)), 2):
            modules = {
                name: module_pair(
                    adapters[i].get(name), adapters[j].get(name), *shapes[name], density, max_entries
                )
                for name in names
            }
            overall = sum(modules.values(), ZERO)
            pairs.append(PairReport(i, j, overall, modules))
    return InterferenceResult(norms, tuple(pairs), density, max_entries, time.perf_counter() - t0)


def adapter_factors(modules: Mapping[str, LoraModule], weight: float) -> dict[str, LoraModule]:
    """A loaded adapter's modules with the merge weight folded into each scale."""
    return {name: LoraModule(m.A, m.B, weight * m.scale) for name, m in modules.items()}


def plan_interference(plan: Plan) -> InterferenceResult:
    """Load the plan's adapters (CPU, float32) and measure their interference at the spec's weights and
    density (else DEFAULT_DENSITY). Reads files; the math is in the functions above."""
    spec = plan.spec
    loaded = [load_adapter(src, "cpu", field=f"spec.adapters[{i}]") for i, src in enumerate(plan.sources)]
    factors = [adapter_factors(a.modules, ref.weight) for a, ref in zip(loaded, spec.adapters, strict=True)]
    density = spec.density if spec.density is not None else DEFAULT_DENSITY
    with intra_op_threads(1):  # every product here is small: threads only spin (see threads.py)
        return interference(factors, density=density)


def to_proto(result: InterferenceResult) -> merge_pb2.InterferenceReport:
    """The result as the PlanResponse.interference message."""

    def stats(module: str, s: PairStats) -> merge_pb2.InterferenceStats:
        return merge_pb2.InterferenceStats(
            module=module,
            cosine=s.cosine,
            norm_ratio=s.norm_ratio if math.isfinite(s.norm_ratio) else 0.0,
            sign_conflict=s.sign_conflict,
            top_overlap=s.top_overlap,
        )

    return merge_pb2.InterferenceReport(
        pairs=[
            merge_pb2.InterferencePair(
                first=p.first,
                second=p.second,
                overall=stats("", p.overall),
                modules=[stats(name, s) for name, s in p.modules.items()],
            )
            for p in result.pairs
        ],
        adapter_norms=list(result.adapter_norms),
        density=result.density,
        max_sampled_entries=result.max_entries,
        seconds=result.seconds,
    )
