"""Estimated build time of a merge from its plan alone (module shapes, ranks, strategy): no tensors.

    seconds = input_bytes / LOAD_BYTES_PER_S                      (read + decode to float32)
            + output_bytes / WRITE_BYTES_PER_S                    (serialize + sha256)
            + Σ_modules work(module) / rate(device)

work per module, in FLOPs (d = d_out·d_in entries, R = Σ r_i, n adapters, ℓ = k + p sketch columns):
- delta, linear, exact:     0 (rank concatenation is a copy)
- delta, linear, rank k<R:  2·(d_out + d_in)·R² (QR of both stacked factors; the R×R SVD is free)
- delta, dense strategies:  d·(2·R + 2·ℓ·(2 + 2·q)) + d·n·PASS_FLOPS_PER_ENTRY
                            (form every ΔW_i once; sketch, q power iterations of two products
                            (``factorize.power_iterations``) and the final projection;
                            prune/sign/merge passes costed as FLOPs per entry)
- factors:                  2·(d_out + d_in)·r·n + the QR compression of the result

Calibration (constants below): ``benchmarks/bench_scale.py`` at Llama-3-8B shapes, 4 adapters r16, on
a 2-core AMD EPYC (large float32 matmul ≈ 130–175 GFLOP/s on two threads): the dense merges sustain
about a third of that rate (ties → r16 at 32 layers: 79 s measured on 2026-12-03, 76 s estimated);
loading reads, hashes and checks about 0.5 GB/s of bfloat16, and the output is written and hashed at
about 0.8 GB/s. The GPU rate is a
deliberately cautious figure for one H100/H200 (not yet measured; re-calibrate from device.sh).
An estimate is meant to size timeouts and progress bars: expect ±2× on other machines or under load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from merge_service.factorize import power_iterations, sketch_width

# Effective FLOP/s of the merge work (not of a large matmul) per device kind.
RATE_FLOPS = {"cpu": 45e9, "cuda": 5e12}
LOAD_BYTES_PER_S = {"cpu": 0.5e9, "cuda": 1.0e9}
WRITE_BYTES_PER_S = {"cpu": 0.8e9, "cuda": 1.0e9}
# Prune + sign election + disjoint mean, per entry per adapter, counted as FLOPs at RATE_FLOPS.
PASS_FLOPS_PER_ENTRY = 24.0


@dataclass(frozen=True)
class ModuleWork:
    d_out: int
    d_in: int
    ranks: tuple[int, ...]  # each adapter's rank for the module (0: absent)


def module_flops(m: ModuleWork, *, dense: bool, linear: bool, factors: bool, rank: int) -> float:
    """The FLOPs of merging one module (see the module docstring for the formulas)."""
    present = [r for r in m.ranks if r > 0]
    total_r = sum(present)
    if factors:
        r = max(present, default=0)
        return 2.0 * (m.d_out + m.d_in) * r * len(present) + 2.0 * (m.d_out + m.d_in) * r * r
    if linear:
        return 0.0 if rank >= total_r else 2.0 * (m.d_out + m.d_in) * total_r * total_r
    if not dense:
        return 0.0
    entries = float(m.d_out) * m.d_in
    width = sketch_width(m.d_out, m.d_in, rank) or min(m.d_out, m.d_in)
    sketch = 2.0 * width * (2 + 2 * power_iterations(m.d_out, m.d_in))
    return entries * (2.0 * total_r + sketch + PASS_FLOPS_PER_ENTRY * len(present))


def estimate_build_seconds(
    modules: Sequence[ModuleWork],
    *,
    linear: bool,
    factors: bool,
    rank: int,
    input_bytes: int,
    output_bytes: int,
    device: str = "cpu",
) -> float:
    """Estimated seconds of ``Merger.build``: load + merge every module + serialize (formula above)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    work = sum(module_flops(m, dense=not linear, linear=linear, factors=factors, rank=rank) for m in modules)
    return (
        input_bytes / LOAD_BYTES_PER_S[kind]
        + output_bytes / WRITE_BYTES_PER_S[kind]
        + work / RATE_FLOPS[kind]
    )
