"""Merge one module of several adapters into one pair of LoRA factors, in either space.

Adapter i contributes, for module m, A_i (r_i, d_in), B_i (d_out, r_i) and its own scale s_i (the
loader's ``adapter.LoraModule``), so its task vector is ΔW_i = s_i·B_i·A_i. An adapter without the
module contributes zero. A merged module is ``factorize.Factors``: B, A and the relative error.

- delta space, linear: B = [w_1 s_1 B_1 … w_n s_n B_n], A = [A_1; …; A_n] is exactly Σ w_i ΔW_i at
  rank Σ r_i; a smaller rank compresses it (QR + small SVD, ``factorize.compress_factors``).
- delta space, other strategies: the dense ΔW_i are merged by the strategy and factored back to the
  requested rank (truncated SVD, ``factorize.truncate_dense``); the error is reported per module.
  The dense merge runs over row blocks of about a megabyte per adapter (``dense_merge``): each block
  of ΔW_i is recomputed from the factors (r multiply-adds per entry), pruned, combined, written once
  into the merged matrix and multiplied into the SVD's random sketch while it is still in cache. No
  d_out×d_in matrix per adapter is ever held; magnitude thresholds come from a sampled band and an
  exact order statistic inside it.
- factors space (as LoRAX does): B' = strategy(s_i·B_i), A' = strategy(A_i) with the same weights;
  needs equal ranks. (Σ w B)(Σ w A) has cross terms and scales one adapter by w², so its reported
  error is the distance from the exact weighted sum Σ w_i ΔW_i.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from merge_service import kernels
from merge_service.adapter import LoraModule
from merge_service.factorize import Factors, compress_factors, gaussian_sketch, sketch_width, truncate_dense
from merge_service.spec import Space
from merge_service.strategies import (
    Combine,
    MaskStream,
    MergeParams,
    Prune,
    SignMethod,
    StrategyDef,
    disjoint_merge,
    keep_count,
    majority_sign,
    tensor_seed,
    weighted_sum,
)
from merge_service.threads import intra_op_threads

T = TypeVar("T")
R = TypeVar("R")

# Elements per adapter per row block on the CPU (256 KiB of float32): the n blocks stay in L2.
BLOCK_ELEMENTS = 1 << 16
# Entries sampled to bracket a magnitude threshold before the exact pass.
THRESHOLD_SAMPLE = 1 << 17
# Row groups of the one-pass banded merge: fixed, so that results do not depend on the thread count.
BANDED_GROUPS = 8


def delta_dense(part: LoraModule) -> torch.Tensor:
    """ΔW = s·B·A as a dense float32 matrix."""
    return (part.B * part.scale) @ part.A


def linear_factors(
    parts: Sequence[LoraModule], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank concatenation: B = [w_i s_i B_i], A = [A_i] so that B·A = Σ w_i s_i B_i A_i exactly."""
    total = sum(p.A.shape[0] for p in parts)
    B = torch.empty(parts[0].B.shape[0], total, dtype=parts[0].B.dtype, device=parts[0].B.device)
    _scaled_columns(parts, weights, B)
    return B, torch.cat([p.A for p in parts], dim=0)


def linear_factors_into(
    parts: Sequence[LoraModule], weights: Sequence[float], B: torch.Tensor, A: torch.Tensor
) -> int:
    """``linear_factors`` written into given B (d_out × ≥R) and A (≥R × d_in), R = Σ r_i:
    B[:, :R] = [w_i s_i B_i], A[:R] = [A_i], the rest zero. Returns R.

    16-bit inputs are first widened into place (exact), then scaled there in the output's dtype, so a
    float32 output has the same bits as widening, concatenating and scaling separately."""
    off = _scaled_columns(parts, weights, B)
    at = 0
    for p in parts:
        A[at : at + p.A.shape[0]].copy_(p.A)
        at += p.A.shape[0]
    B[:, off:].zero_()
    A[off:].zero_()
    return off


def _scaled_columns(parts: Sequence[LoraModule], weights: Sequence[float], B: torch.Tensor) -> int:
    """B[:, R_<i : R_<i + r_i] = w_i s_i B_i; returns R = Σ r_i."""
    off = 0
    for p, w in zip(parts, weights, strict=True):
        r = p.A.shape[0]
        b = B[:, off : off + r]
        if p.B.dtype == B.dtype and p.B.device == B.device:
            torch.mul(p.B, w * p.scale, out=b)  # one pass per factor
        else:
            b.copy_(p.B)
            b.mul_(w * p.scale)
        off += r
    return off


def factored_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F without forming B·A: sqrt(trace((BᵀB)(AAᵀ))), in float64."""
    b, a = B.double(), A.double()
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def _present(
    parts: Sequence[LoraModule | None], weights: Sequence[float], keys: Sequence[str]
) -> tuple[list[LoraModule], list[float], list[str]]:
    kept = [(p, w, k) for p, w, k in zip(parts, weights, keys, strict=True) if p is not None]
    return [p for p, _, _ in kept], [w for _, w, _ in kept], [k for _, _, k in kept]


def merge_module(
    module: str,
    parts: Sequence[LoraModule | None],
    weights: Sequence[float],
    keys: Sequence[str],
    strategy: StrategyDef,
    params: MergeParams,
    space: Space,
    rank: int,
    workspace: Workspace | None = None,
) -> Factors:
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
        return f
    seeds = [tensor_seed(params.seed, module, key, "delta") for key in k]
    d_out, d_in = present[0].B.shape[0], present[0].A.shape[1]
    svd_seed = tensor_seed(0, module, "svd")
    width = sketch_width(d_out, d_in, rank)
    omega = gaussian_sketch(d_in, width, svd_seed, present[0].A.device) if width else None
    merged, total_sq, y = dense_merge(present, w, strategy, params, seeds, omega=omega, out=workspace)
    f = truncate_dense(
        merged, rank, seed=svd_seed, sketch=(omega, y) if omega is not None else None, total_sq=total_sq
    )
    return f


@dataclass(frozen=True)
class Threshold:
    """Keep |x| > value, plus the first ``ties`` entries (row-major) with |x| == value."""

    value: float
    ties: int


def row_blocks(d_out: int, d_in: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges of about BLOCK_ELEMENTS entries on the CPU; one block on an accelerator."""
    rows = d_out if device.type != "cpu" else max(1, BLOCK_ELEMENTS // d_in)
    return [(r, min(r + rows, d_out)) for r in range(0, d_out, rows)]


def _exact_threshold(mag: torch.Tensor, k: int) -> Threshold:
    n = mag.numel()
    v = torch.kthvalue(mag.reshape(-1), n - k + 1).values
    return Threshold(float(v), k - int((mag > v).sum()))


@dataclass(frozen=True)
class Band:
    """The k-th largest magnitude of a matrix lies in (lo, hi] with overwhelming probability."""

    k: int
    lo: float
    hi: float


def sampled_band(bs: torch.Tensor, a: torch.Tensor, k: int, seed: int) -> Band:
    """A band (lo, hi] bracketing the k-th largest |Bs·A| entry, from THRESHOLD_SAMPLE sampled entries.

    With q = 1 − k/n the band spans the sample quantiles q ± (6·sqrt(q(1−q)/s) + 2/s) (s: sample size):
    six standard errors of a sample quantile, so the true order statistic misses it about once in 10⁹.
    The band never changes the merged matrix, but it does decide which entries the banded merge sets
    aside, and MΩ is patched from their provisional values, so its last bits (and the factors') follow
    the band: the sampling arithmetic is part of the algorithm version.
    """
    d_in = a.shape[1]
    n = bs.shape[0] * d_in
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, n, (THRESHOLD_SAMPLE,), generator=gen)
    q = 1.0 - k / n
    margin = 6.0 * math.sqrt(q * (1.0 - q) / THRESHOLD_SAMPLE) + 2.0 / THRESHOLD_SAMPLE
    last = THRESHOLD_SAMPLE - 1
    j_lo = math.floor((q - margin) * last) if q - margin > 0 else None
    j_hi = math.ceil((q + margin) * last) if q + margin < 1 else None
    wanted = [j for j in (j_lo, j_hi) if j is not None]
    if kernels.AVAILABLE and bs.device.type == "cpu":
        sample = np.empty(THRESHOLD_SAMPLE, dtype=np.float32)
        kernels.sampled_magnitudes(bs.contiguous().numpy(), a.T.contiguous().numpy(), idx.numpy(), sample)
        part = np.partition(sample, wanted) if wanted else sample
        stats = {j: float(part[j]) for j in wanted}  # the j-th smallest (0-based) of the sample
    else:
        idx = idx.to(bs.device)
        mags = (bs[idx // d_in] * a.T.contiguous()[idx % d_in]).sum(dim=1).abs()  # rows gathered, not columns
        stats = {j: float(torch.kthvalue(mags, j + 1).values) for j in wanted}
    lo = stats[j_lo] if j_lo is not None else -1.0
    hi = stats[j_hi] if j_hi is not None else math.inf
    return Band(k, lo, hi)


def band_threshold(inside: torch.Tensor, above: int, k: int) -> Threshold | None:
    """The exact threshold from the magnitudes inside the band and the count above it (None: the band
    missed the k-th largest, so the caller must fall back to a full pass)."""
    need = k - above
    if not 0 < need <= inside.numel():
        return None
    v = torch.kthvalue(inside, inside.numel() - need + 1).values
    return Threshold(float(v), k - above - int((inside > v).sum()))


def magnitude_threshold(
    bs: torch.Tensor, a: torch.Tensor, density: float, seed: int, blocks: list[tuple[int, int]]
) -> Threshold | None:
    """The threshold that keeps exactly k = floor(density·n) entries of |Bs·A| (None: keep all).

    A sample of entries brackets the k-th largest magnitude in a band [lo, hi] a few standard errors
    wide; one blocked pass counts the entries above the band and collects those inside it, and the
    exact order statistic is taken within the band. A band that misses it falls back to the full sort.
    """
    d_out, d_in = bs.shape[0], a.shape[1]
    n = d_out * d_in
    k = keep_count(n, density)
    if k >= n:
        return None
    if k == 0:
        return Threshold(math.inf, 0)
    if n <= 4 * THRESHOLD_SAMPLE or len(blocks) == 1:
        return _exact_threshold((bs @ a).abs(), k)
    band_ = sampled_band(bs, a, k, seed)
    lo, hi = band_.lo, band_.hi
    q = 1.0 - k / n
    margin = 6.0 * math.sqrt(q * (1.0 - q) / THRESHOLD_SAMPLE) + 2.0 / THRESHOLD_SAMPLE
    above = 0
    if kernels.AVAILABLE and bs.device.type == "cpu":
        expected = 2.0 * margin * n
        band_np = np.empty(int(2 * expected) + 4096, dtype=np.float32)
        filled = 0
        for r0, r1 in blocks:
            blk_above, filled = kernels.scan_band((bs[r0:r1] @ a).numpy(), lo, hi, band_np, filled)
            above += blk_above
        if filled > band_np.shape[0]:
            return _exact_threshold((bs @ a).abs(), k)
        inside = torch.from_numpy(band_np[:filled])
    else:
        band: list[torch.Tensor] = []
        for r0, r1 in blocks:
            mag = (bs[r0:r1] @ a).abs_()
            above += int((mag > hi).sum())
            band.append(mag[(mag > lo) & (mag <= hi)])
        inside = torch.cat(band)
    th = band_threshold(inside, above, k)
    return th if th is not None else _exact_threshold((bs @ a).abs(), k)


def dense_merge(
    parts: Sequence[LoraModule],
    weights: Sequence[float],
    strategy: StrategyDef,
    params: MergeParams,
    seeds: Sequence[int],
    *,
    omega: torch.Tensor | None = None,
    out: Workspace | None = None,
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """strategy(ΔW_1..ΔW_n) as a dense matrix, with ‖·‖² and (when ``omega`` is given) the sketch M·Ω.

    Equal, entry for entry, to ``strategy.fn`` applied to the dense ΔW_i = (s_i·B_i)·A_i: the same
    thresholds, the same mask streams, the same order of operations per entry.
    """
    bs = [p.B * p.scale for p in parts]
    d_out, d_in = bs[0].shape[0], parts[0].A.shape[1]
    device = bs[0].device
    blocks = row_blocks(d_out, d_in, device)
    density = params.density
    thresholds: list[Threshold | None] = [None] * len(parts)
    streams: list[MaskStream | None] = [None] * len(parts)
    if strategy.prune == Prune.MAGNITUDE and kernels.AVAILABLE and device.type == "cpu":
        banded = _banded_merge(bs, parts, weights, strategy, params, seeds, blocks, omega, out)
        if banded is not None:
            return banded
    if strategy.prune == Prune.MAGNITUDE:
        thresholds = [
            magnitude_threshold(b, p.A, density, seed, blocks)
            for b, p, seed in zip(bs, parts, seeds, strict=True)
        ]
    elif strategy.prune == Prune.RANDOM and density < 1.0:
        streams = [MaskStream(seed, density) for seed in seeds]
    merged = out.matrix(d_out, d_in, device) if out is not None else torch.empty(d_out, d_in, device=device)
    y = torch.empty(d_out, omega.shape[1], device=device) if omega is not None else None
    if kernels.AVAILABLE and device.type == "cpu":
        total_sq = _fused_blocks(
            bs, parts, weights, strategy, params, seeds, thresholds, blocks, merged, omega, y
        )
        return merged, total_sq, y
    ties_left = [t.ties if t is not None else 0 for t in thresholds]
    total_sq = 0.0
    for r0, r1 in blocks:
        pruned = []
        for i, (b, p) in enumerate(zip(bs, parts, strict=True)):
            d = b[r0:r1] @ p.A
            th, stream = thresholds[i], streams[i]
            if th is not None:
                mag = d.abs()
                keep = mag > th.value
                if ties_left[i] > 0:
                    eq = torch.nonzero((mag == th.value).reshape(-1)).squeeze(1)[: ties_left[i]]
                    keep.view(-1)[eq] = True
                    ties_left[i] -= eq.numel()
                d.mul_(keep)
            elif stream is not None:
                d.mul_(stream.take(d.numel()).view(d.shape).to(device)).div_(density)
            pruned.append(d)
        if strategy.combine == Combine.SUM:
            block = weighted_sum(pruned, weights)
        else:
            stacked = torch.stack(pruned)
            w = torch.tensor(list(weights), dtype=stacked.dtype, device=device)
            block = disjoint_merge(stacked, w, majority_sign(stacked, params.sign_method))
        merged[r0:r1] = block
        total_sq += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
        if y is not None:
            torch.matmul(block, omega, out=y[r0:r1])
    return merged, total_sq, y


@dataclass(eq=False)
class _Group:
    """One contiguous run of row blocks of the one-pass banded merge, with its own set-aside entries."""

    blocks: list[tuple[int, int]]
    def_idx: np.ndarray
    def_vals: np.ndarray
    above: np.ndarray
    n_def: int = 0
    block_sq: list[float] | None = None
    overflow: bool = False
    ties: np.ndarray | None = None  # per adapter: this group's share of the threshold's tie quota
    delta_sq: float = 0.0  # Σ (patched² − provisional²) over its set-aside entries
    scratch: GroupBuffers | None = None


def _banded_merge(
    bs: list[torch.Tensor],
    parts: Sequence[LoraModule],
    weights: Sequence[float],
    strategy: StrategyDef,
    params: MergeParams,
    seeds: Sequence[int],
    blocks: list[tuple[int, int]],
    omega: torch.Tensor | None,
    out: Workspace | None,
) -> tuple[torch.Tensor, float, torch.Tensor | None] | None:
    """Magnitude pruning in one pass over the ΔW_i instead of two (CPU, numba).

    Each adapter's k-th magnitude is bracketed by a sampled band (lo_i, hi_i]. One blocked pass forms
    the ΔW_i blocks, keeps |x| > hi_i, drops |x| <= lo_i, counts the entries above each band, merges,
    sketches, and sets aside every entry with some |x_i| inside its band (a few per cent) with its n
    values. The exact thresholds then come from those values alone (``kernels.kth_largest``), and the
    set-aside entries are merged with them and patched into M, ‖M‖² and MΩ (``kernels.fix_deferred``).
    The result equals ``strategy.fn`` on the dense ΔW_i entry for entry. None: not worth it (small
    matrices) or a band missed; the caller then takes the two-pass route.

    The rows are cut into BANDED_GROUPS contiguous groups, each with its own set-aside list, run on up to
    torch's thread count of worker threads (one intra-op thread each: the kernels are single-threaded).
    The tie quota of each threshold is handed out over the groups in row order, so the groups can be
    patched independently and still keep the row-major first ties; the float64 sums are added per block
    and per group in order. The group count is fixed, so the bytes do not depend on the thread count.
    """
    n, d_out, d_in = len(parts), bs[0].shape[0], parts[0].A.shape[1]
    size = d_out * d_in
    if size <= 4 * THRESHOLD_SAMPLE or len(blocks) == 1:
        return None
    k = keep_count(size, params.density)
    lo = np.full(n, -1.0, dtype=np.float32)
    hi = np.full(n, -1.0, dtype=np.float32)
    fraction = 0.0
    if k == 0:
        lo[:], hi[:] = np.inf, np.inf
    elif k < size:
        for i, (b, p, seed) in enumerate(zip(bs, parts, seeds, strict=True)):
            band = sampled_band(b, p.A, k, seed)
            lo[i], hi[i] = band.lo, band.hi
        q = 1.0 - k / size
        fraction = 2.0 * (6.0 * math.sqrt(q * (1.0 - q) / THRESHOLD_SAMPLE) + 2.0 / THRESHOLD_SAMPLE)
    w = np.array(list(weights), dtype=np.float32)
    device = bs[0].device
    merged = out.matrix(d_out, d_in, device) if out is not None else torch.empty(d_out, d_in, device=device)
    y = torch.empty(d_out, omega.shape[1]) if omega is not None else None
    disjoint = strategy.combine == Combine.DISJOINT
    frequency = params.sign_method == SignMethod.FREQUENCY
    max_rows = max(r1 - r0 for r0, r1 in blocks)
    groups = []
    for g in range(min(BANDED_GROUPS, len(blocks))):
        part = blocks[g * len(blocks) // BANDED_GROUPS : (g + 1) * len(blocks) // BANDED_GROUPS]
        if not part:
            continue
        entries = (part[-1][1] - part[0][0]) * d_in
        cap = int(1.5 * min(1.0, n * fraction) * entries) + 4096
        ws = out.group(len(groups)) if out is not None else GroupBuffers()
        idx, vals = ws.deferred(cap, n)
        groups.append(_Group(part, idx, vals, np.zeros(n, dtype=np.int64), scratch=ws))

    def scan(group: _Group) -> None:
        buf = group.scratch.blocks(n * max_rows * d_in)
        sums = []
        with intra_op_threads(1):
            for r0, r1 in group.blocks:
                d = buf[: n * (r1 - r0) * d_in].view(n, r1 - r0, d_in)
                for i in range(n):
                    torch.matmul(bs[i][r0:r1], parts[i].A, out=d[i])
                block = merged[r0:r1]
                blk_sq, group.n_def = kernels.merge_block_banded(
                    d.numpy(), w, lo, hi, disjoint, frequency, block.numpy(), r0 * d_in,
                    group.above, group.def_idx, group.def_vals, group.n_def,
                )  # fmt: skip
                sums.append(blk_sq)
                if group.n_def > group.def_idx.shape[0]:
                    group.overflow = True
                    return
                if y is not None:
                    torch.matmul(block, omega, out=y[r0:r1])
        group.block_sq = sums

    _run_groups(scan, groups)
    if any(g.overflow for g in groups):
        return None
    total_sq = sum(s for g in groups for s in (g.block_sq or []))
    th = np.full(n, -1.0, dtype=np.float32)
    for g in groups:
        g.ties = np.zeros(n, dtype=np.int64)
    if 0 < k < size:
        workers = min(torch.get_num_threads(), n)
        room = sum(g.n_def for g in groups) + 1
        bufs = [(out.group(t) if out is not None else GroupBuffers()).band(room) for t in range(workers)]

        def thresholds(t: int) -> bool:
            """The exact thresholds of adapters t, t + workers, … (False: a band missed the k-th largest)."""
            buf = bufs[t]
            for i in range(t, n, workers):
                filled = 0
                for g in groups:
                    filled = kernels.band_values(g.def_vals, g.n_def, i, lo[i], hi[i], buf, filled)
                need = k - int(sum(g.above[i] for g in groups))
                if not 0 < need <= filled:
                    return False
                value, greater = kernels.kth_largest(buf[:filled], need)
                th[i] = value
                left = need - greater  # ties to keep at the threshold, the first ones in row order
                for g in groups:
                    g.ties[i] = min(left, kernels.count_equal(g.def_vals, g.n_def, i, th[i]))
                    left -= int(g.ties[i])
            return True

        if not all(_run_groups(thresholds, list(range(workers)))):
            return None
    elif k == 0:
        th[:] = np.inf
    sketch = y is not None
    flat = merged.view(-1).numpy()
    omega_np = omega.numpy() if omega is not None else np.empty((d_in, 0), dtype=np.float32)
    y_np = y.numpy() if y is not None else np.empty((1, 0), dtype=np.float32)

    def patch(group: _Group) -> None:
        group.delta_sq = kernels.fix_deferred(
            group.def_idx, group.def_vals, group.n_def, w, th, group.ties, disjoint, frequency,
            flat, omega_np, y_np, sketch,
        )  # fmt: skip

    _run_groups(patch, groups)
    return merged, total_sq + sum(g.delta_sq for g in groups), y


def _run_groups(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """[fn(item) for item in items], on up to torch's intra-op thread count of threads."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="banded") as pool:
        return [f.result() for f in [pool.submit(fn, item) for item in items]]


def _fused_blocks(
    bs: list[torch.Tensor],
    parts: Sequence[LoraModule],
    weights: Sequence[float],
    strategy: StrategyDef,
    params: MergeParams,
    seeds: Sequence[int],
    thresholds: list[Threshold | None],
    blocks: list[tuple[int, int]],
    merged: torch.Tensor,
    omega: torch.Tensor | None,
    y: torch.Tensor | None,
) -> float:
    """The CPU path of ``dense_merge``: per block, the n ΔW_i blocks by matmul, then one fused kernel."""
    n, d_in = len(parts), parts[0].A.shape[1]
    density = params.density
    prune = kernels.PRUNE_NONE
    if strategy.prune == Prune.MAGNITUDE and any(t is not None for t in thresholds):
        prune = kernels.PRUNE_MAGNITUDE
    elif strategy.prune == Prune.RANDOM and density < 1.0:
        prune = kernels.PRUNE_RANDOM
    th = np.array([t.value if t is not None else -1.0 for t in thresholds], dtype=np.float32)
    ties_left = np.array([t.ties if t is not None else 0 for t in thresholds], dtype=np.int64)
    rng = (
        np.stack([kernels.sfc64_state(s) for s in seeds])
        if prune == kernels.PRUNE_RANDOM
        else np.zeros((n, 4), np.uint64)
    )
    keep_below = np.uint64(min(math.floor(density * 2.0**64), 2**64 - 1))
    w = np.array(list(weights), dtype=np.float32)
    disjoint = strategy.combine == Combine.DISJOINT
    frequency = params.sign_method == SignMethod.FREQUENCY
    workers = min(torch.get_num_threads(), n)
    if prune == kernels.PRUNE_RANDOM and workers >= 2:
        draws = _RandomDraws(rng, keep_below, density)
        return _random_blocks_threaded(
            bs, parts, w, draws, disjoint, frequency, blocks, merged, omega, y, workers
        )
    max_rows = max(r1 - r0 for r0, r1 in blocks)
    buf = torch.empty(n * max_rows * d_in)
    total_sq = 0.0
    for r0, r1 in blocks:
        d = buf[: n * (r1 - r0) * d_in].view(n, r1 - r0, d_in)
        for i in range(n):
            torch.matmul(bs[i][r0:r1], parts[i].A, out=d[i])
        block = merged[r0:r1]
        total_sq += kernels.merge_block(
            d.numpy(),
            w,
            prune,
            th,
            ties_left,
            rng,
            keep_below,
            density,
            disjoint,
            frequency,
            block.numpy(),
        )
        if y is not None:
            torch.matmul(block, omega, out=y[r0:r1])
    return total_sq


@dataclass(frozen=True)
class _RandomDraws:
    """The mask streams of a random prune: SFC64 states (n × 4, advanced in place) and the keep test."""

    rng: np.ndarray
    keep_below: np.uint64
    density: float


def _random_blocks_threaded(
    bs: list[torch.Tensor],
    parts: Sequence[LoraModule],
    w: np.ndarray,
    draws: _RandomDraws,
    disjoint: bool,
    frequency: bool,
    blocks: list[tuple[int, int]],
    merged: torch.Tensor,
    omega: torch.Tensor | None,
    y: torch.Tensor | None,
    workers: int,
) -> float:
    """``_fused_blocks`` for a random prune on ``workers`` threads, with the same result.

    The mask draws are serial per stream (SFC64 has no jump-ahead) and cost most of the kernel, so the
    work is split by adapter, not by row: per block, worker t forms the ΔW_i of its adapter pairs and
    draws their masks; once every worker is past that point it combines its share of the rows, and
    sketches the previous block if that one is its turn. Two ΔW buffers alternate, so one barrier per
    block is enough: a worker forming block b has passed barrier b − 1, which every worker reaches only
    after it has combined block b − 2, the last reader of that buffer."""
    n, d_in = len(parts), parts[0].A.shape[1]
    # (first adapter, paired with the next): a pair draws faster than two streams apart, but every
    # worker needs a share
    units = [(i, i + 1 < n) for i in range(0, n, 2)]
    if len(units) < workers:
        units = [(i, False) for i in range(n)]
    max_rows = max(r1 - r0 for r0, r1 in blocks)
    bufs = [torch.empty(n * max_rows * d_in) for _ in range(2)]
    barrier = threading.Barrier(workers)
    sums = [0.0] * workers

    def sketch(b: int) -> None:
        r0, r1 = blocks[b]
        if y is not None:
            torch.matmul(merged[r0:r1], omega, out=y[r0:r1])

    def work(t: int) -> None:
        keep_a, keep_b = np.empty(d_in, dtype=np.bool_), np.empty(d_in, dtype=np.bool_)
        total = 0.0
        try:
            with intra_op_threads(1):
                for b, (r0, r1) in enumerate(blocks):
                    d = bufs[b % 2][: n * (r1 - r0) * d_in].view(n, r1 - r0, d_in)
                    dn = d.numpy()
                    for i, two in units[t::workers]:
                        for j in (i, i + 1) if two else (i,):
                            torch.matmul(bs[j][r0:r1], parts[j].A, out=d[j])
                        kernels.random_prune_rows(
                            dn, i, two, draws.rng, draws.keep_below, draws.density, keep_a, keep_b
                        )
                    barrier.wait()
                    rows = r1 - r0
                    total += kernels.combine_rows(
                        dn, w, disjoint, frequency, rows * t // workers, rows * (t + 1) // workers,
                        merged[r0:r1].numpy(),
                    )  # fmt: skip
                    if b > 0 and (b - 1) % workers == t:
                        sketch(b - 1)
            sums[t] = total
        except BaseException:
            barrier.abort()  # the other workers would wait for this one forever
            raise

    with ThreadPoolExecutor(workers, thread_name_prefix="random-prune") as pool:
        futures = [pool.submit(work, t) for t in range(workers)]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:  # the first worker's own error, not the broken barrier it left the others
        raise next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)), failed[0])
    with intra_op_threads(1):  # as every other block's sketch: the bytes must not depend on who ran it
        sketch(len(blocks) - 1)
    return sum(sums)


class GroupBuffers:
    """The set-aside lists and the ΔW row-block buffer of one row group (and the in-band values of
    one threshold worker), kept from module to module:
    allocated afresh (tens of megabytes per module, from worker threads), they fragmented the heap
    until peak RSS wandered by half a gigabyte from run to run."""

    def __init__(self) -> None:
        self._idx = np.empty(0, dtype=np.int64)
        self._vals = np.empty(0, dtype=np.float32)
        self._blocks = torch.empty(0)
        self._band = np.empty(0, dtype=np.float32)

    def deferred(self, cap: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices[cap], values[n, cap]), contiguous, contents undefined."""
        if self._idx.shape[0] < cap:
            self._idx = np.empty(cap, dtype=np.int64)
        if self._vals.shape[0] < n * cap:
            self._vals = np.empty(n * cap, dtype=np.float32)
        return self._idx[:cap], self._vals[: n * cap].reshape(n, cap)

    def band(self, size: int) -> np.ndarray:
        """float32[size], contents undefined: the in-band values of one adapter at a time."""
        if self._band.shape[0] < size:
            self._band = np.empty(size, dtype=np.float32)
        return self._band[:size]

    def blocks(self, size: int) -> torch.Tensor:
        if self._blocks.numel() < size:
            self._blocks = torch.empty(size)
        return self._blocks[:size]


class Workspace:
    """One reusable buffer for the merged dense matrix of each module: fresh multi-megabyte
    allocations are page-faulted in on every use, a reused one is not. Also each row group's buffers."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._groups: list[GroupBuffers] = []

    def group(self, g: int) -> GroupBuffers:
        while len(self._groups) <= g:
            self._groups.append(GroupBuffers())
        return self._groups[g]

    def matrix(self, d_out: int, d_in: int, device: torch.device) -> torch.Tensor:
        n = d_out * d_in
        if self._buf is None or self._buf.numel() < n or self._buf.device != device:
            self._buf = torch.empty(n, device=device)
        return self._buf[:n].view(d_out, d_in)


def _merge_factors(
    module: str,
    parts: Sequence[LoraModule],
    weights: Sequence[float],
    keys: Sequence[str],
    strategy: StrategyDef,
    params: MergeParams,
    rank: int,
) -> Factors:
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
    return Factors(f.B, f.A, err)


def pad_rank(result: Factors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
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
