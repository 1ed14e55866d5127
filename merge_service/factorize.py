"""Low-rank factorizations: from merged task vectors back to LoRA factors B (d_out, k) and A (k, d_in).

Two routes:
- ``compress_factors``: ΔW is given as a product B·A of rank R (e.g. rank concatenation). QR of both
  stacked factors and an SVD of the small R×R core give the best rank-k approximation in O(d·R²);
  the d_out×d_in matrix is never formed.
- ``truncate_dense``: ΔW is a dense matrix (after TIES/DARE/pruning). A truncated SVD, randomized
  (Halko, Martinsson & Tropp 2011) when k is small next to min(d_out, d_in), exact otherwise.

Both split the singular values evenly between the factors (B = U·√S, A = √S·Vᵀ) so neither factor
holds all the dynamic range (kinder to bfloat16/float16 outputs), and both report the relative
reconstruction error ‖ΔW − B·A‖_F / ‖ΔW‖_F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Factors:
    """ΔW ≈ B @ A with B (d_out, rank) and A (rank, d_in); ``relative_error`` = ‖ΔW − BA‖_F / ‖ΔW‖_F."""

    B: torch.Tensor
    A: torch.Tensor
    relative_error: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def relative_tail(s: torch.Tensor, k: int, total_sq: float | None = None) -> float:
    """‖tail‖/‖all‖ of singular values: sqrt(Σ_{i≥k} s_i²) / sqrt(total) with total = Σ s_i² by default."""
    s64 = s.double()
    total = float((s64 * s64).sum()) if total_sq is None else total_sq
    if total <= 0.0:
        return 0.0
    kept = float((s64[:k] * s64[:k]).sum())
    return math.sqrt(max(total - kept, 0.0) / total)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_k·√S_k, A = √S_k·Vh_k."""
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def compress_factors(B: torch.Tensor, A: torch.Tensor, k: int) -> Factors:
    """Best rank-k approximation of B·A (B: d_out×R, A: R×d_in) without forming it.

    B = Q_B R_B, Aᵀ = Q_A R_A, core C = R_B R_Aᵀ (R×R) = U S Vᵀ, so B·A = (Q_B U) S (Q_A V)ᵀ.
    Keeping k ≥ R returns the inputs unchanged (exact).
    """
    R = A.shape[0]
    if k >= R:
        return Factors(B, A, 0.0)
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    bk, ak = _split(qb @ u, s, vh @ qa.T, k)
    return Factors(bk.to(B.dtype).contiguous(), ak.to(A.dtype).contiguous(), relative_tail(s, k))


# Power iterations of the randomized SVD: two below this many entries, one from it on. Small modules get
# the second for little cost (1.003x against 1.011x the optimum at TinyLlama shapes); from 4096 x 4096 on
# one is within 1.004x, and a second would read the matrix twice more.
SECOND_ITERATION_BELOW = 1 << 24


def power_iterations(d_out: int, d_in: int) -> int:
    """Power iterations q for a d_out × d_in matrix: 2 below SECOND_ITERATION_BELOW entries, else 1."""
    return 2 if d_out * d_in < SECOND_ITERATION_BELOW else 1


def sketch_width(d_out: int, d_in: int, k: int, oversample: int | None = None) -> int | None:
    """Columns ℓ = k + p of the random sketch when a randomized SVD pays (ℓ well below min(d_out, d_in)),
    else None (exact SVD, or no SVD at all when k ≥ min(d_out, d_in))."""
    p = max(10, k) if oversample is None else oversample
    small = min(d_out, d_in)
    return k + p if k < small and (k + p) * 4 <= small else None


def gaussian_sketch(d_in: int, width: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Ω (d_in × width) of N(0, 1) draws, made on the CPU from ``seed``: every device gets the same sketch."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(d_in, width, generator=gen).to(device)


def randomized_svd(
    m: torch.Tensor,
    k: int,
    omega: torch.Tensor,
    *,
    power_iters: int = 1,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range finder with power iterations, then an exact SVD of the small projection (Halko et al.).

    Y = M Ω (``y`` when the caller already has it); q times: Q = orth(Mᵀ orth(Y)) … with QR between
    products for stability; QᵀM = Ũ S Vᵀ; U = Q Ũ.
    """
    q, _ = torch.linalg.qr(m @ omega if y is None else y)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr((q.T @ m).T)  # Mᵀq read row-major: a row-major M streams once, in order
        q, _ = torch.linalg.qr(m @ z)
    u, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return q @ u, s, vh


def truncate_dense(
    m: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int | None = None,
    randomized: bool | None = None,
    sketch: tuple[torch.Tensor, torch.Tensor] | None = None,
    total_sq: float | None = None,
) -> Factors:
    """Factor a dense d_out×d_in matrix into rank k.

    k ≥ min(d_out, d_in) is exact with no SVD at all: B = M, A = I (or B = I, A = M); M is copied.
    Otherwise the SVD is randomized when the sketch is well below min(d_out, d_in) (the error is then
    within a hair of the optimum; see the benchmark), and exact otherwise. ``sketch`` = (Ω, MΩ) and
    ``total_sq`` = ‖M‖² let a caller that streamed M block by block skip those passes. ``power_iters``
    defaults to ``power_iterations(d_out, d_in)``.
    """
    d_out, d_in = m.shape
    if power_iters is None:
        power_iters = power_iterations(d_out, d_in)
    if k >= d_in and d_in <= d_out:
        return Factors(m.clone(), torch.eye(d_in, dtype=m.dtype, device=m.device), 0.0)
    if k >= d_out:
        return Factors(torch.eye(d_out, dtype=m.dtype, device=m.device), m.clone(), 0.0)
    if total_sq is None:
        total_sq = float(torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2
    width = sketch_width(d_out, d_in, k, oversample)
    if randomized is not None:
        width = (width or min(k + max(10, k), d_out, d_in)) if randomized else None
    if sketch is not None or width is not None:
        omega, y = sketch if sketch is not None else (gaussian_sketch(d_in, width, seed, m.device), None)
        u, s, vh = randomized_svd(m, k, omega, power_iters=power_iters, y=y)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    bk, ak = _split(u, s, vh, k)
    return Factors(bk.contiguous(), ak.contiguous(), relative_tail(s, k, total_sq))


def relative_error(dense: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """‖M − B·A‖_F / ‖M‖_F computed directly (for tests and benchmarks)."""
    ref = dense.double()
    norm = float(ref.norm())
    return float((ref - B.double() @ A.double()).norm()) / norm if norm > 0 else 0.0
