"""Fused CPU kernels (numba) for the blocked dense merge: one pass over a row block instead of a dozen
tensor operations, each of which would stream the block through memory again.

They compute exactly what the tensor code in ``strategies``/``engine`` computes — the same thresholds
and tie quotas in row-major order, the same SFC64 mask stream (numpy's generator, re-implemented here
and started from numpy's seeded state), the same sign election and disjoint mean — in float32 with
the adapters summed in order, so results agree with the tensor path to float32 round-off.

numba comes with vLLM (both the CPU and the CUDA builds pin it). Without it, ``AVAILABLE`` is False and
the engine uses the tensor path.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

AVAILABLE = numba is not None

PRUNE_NONE, PRUNE_MAGNITUDE, PRUNE_RANDOM = 0, 1, 2


def sfc64_state(seed: int) -> np.ndarray:
    """numpy's SFC64(seed) state as uint64[4] (a, b, c, counter): where ``sfc64_next`` starts."""
    st = np.random.SFC64(seed).state["state"]
    return np.array([st["state"][0], st["state"][1], st["state"][2], st["state"][3]], dtype=np.uint64)


if AVAILABLE:
    _jit = numba.njit(cache=True, nogil=True, boundscheck=False)

    @_jit
    def sfc64_next(state: np.ndarray, i: int) -> np.uint64:  # pragma: no cover - compiled
        """One raw output of SFC64 (Doty-Humphrey's small fast chaotic generator), as numpy draws it."""
        a, b, c, counter = state[i, 0], state[i, 1], state[i, 2], state[i, 3]
        tmp = a + b + counter
        state[i, 3] = counter + np.uint64(1)
        state[i, 0] = b ^ (b >> np.uint64(11))
        state[i, 1] = c + (c << np.uint64(3))
        state[i, 2] = ((c << np.uint64(24)) | (c >> np.uint64(40))) + tmp
        return tmp

    @_jit
    def random_prune_row(
        state: np.ndarray, i: int, row: np.ndarray, keep_below: np.uint64, dens: np.float32, keep: np.ndarray
    ) -> None:  # pragma: no cover - compiled
        """row[c] = row[c] / dens where the next draw of stream i is below ``keep_below``, else 0: the
        draws of ``sfc64_next`` with the state held in registers for the row (a dependency chain of a
        few cycles per draw instead of a store and reload of the state array). ``keep``: scratch."""
        a, b, c, counter = state[i, 0], state[i, 1], state[i, 2], state[i, 3]
        zero = np.float32(0.0)
        one = np.uint64(1)
        for j in range(row.shape[0]):  # the draws: sequential, nothing else in the loop
            tmp = a + b + counter
            counter += one
            a = b ^ (b >> np.uint64(11))
            b = c + (c << np.uint64(3))
            c = ((c << np.uint64(24)) | (c >> np.uint64(40))) + tmp
            keep[j] = tmp < keep_below
        state[i, 0], state[i, 1], state[i, 2], state[i, 3] = a, b, c, counter
        for j in range(row.shape[0]):  # the division vectorizes once it is out of the draw loop
            row[j] = row[j] / dens if keep[j] else zero

    @_jit
    def random_prune_pair(
        state: np.ndarray,
        i: int,
        row_i: np.ndarray,
        row_j: np.ndarray,
        keep_below: np.uint64,
        dens: np.float32,
        keep_i: np.ndarray,
        keep_j: np.ndarray,
    ) -> None:  # pragma: no cover - compiled
        """``random_prune_row`` for streams i and i + 1 at once: two independent dependency chains in one
        loop, so the core overlaps them (each stream still draws in its own order)."""
        j = i + 1
        a0, b0, c0, k0 = state[i, 0], state[i, 1], state[i, 2], state[i, 3]
        a1, b1, c1, k1 = state[j, 0], state[j, 1], state[j, 2], state[j, 3]
        zero = np.float32(0.0)
        one = np.uint64(1)
        for col in range(row_i.shape[0]):
            t0 = a0 + b0 + k0
            t1 = a1 + b1 + k1
            k0 += one
            k1 += one
            a0 = b0 ^ (b0 >> np.uint64(11))
            a1 = b1 ^ (b1 >> np.uint64(11))
            b0 = c0 + (c0 << np.uint64(3))
            b1 = c1 + (c1 << np.uint64(3))
            c0 = ((c0 << np.uint64(24)) | (c0 >> np.uint64(40))) + t0
            c1 = ((c1 << np.uint64(24)) | (c1 >> np.uint64(40))) + t1
            keep_i[col] = t0 < keep_below
            keep_j[col] = t1 < keep_below
        state[i, 0], state[i, 1], state[i, 2], state[i, 3] = a0, b0, c0, k0
        state[j, 0], state[j, 1], state[j, 2], state[j, 3] = a1, b1, c1, k1
        for col in range(row_i.shape[0]):
            row_i[col] = row_i[col] / dens if keep_i[col] else zero
            row_j[col] = row_j[col] / dens if keep_j[col] else zero

    @_jit
    def sfc64_raw(state: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
        """Fill ``out`` with raw draws of stream 0 of ``state`` (for tests against numpy)."""
        for j in range(out.shape[0]):
            out[j] = sfc64_next(state, 0)

    @_jit
    def scan_band(
        d: np.ndarray, lo: float, hi: float, band: np.ndarray, filled: int
    ) -> tuple[int, int]:  # pragma: no cover - compiled
        """Count |d| > hi and append the |d| in (lo, hi] to ``band`` from ``filled`` on.
        Returns (count above, new fill); a fill beyond ``band``'s size means it overflowed.
        Branch-free: every value is written at the fill position, which advances only for band values."""
        flat = d.reshape(-1)
        lo32, hi32 = np.float32(lo), np.float32(hi)
        above = 0
        last = band.shape[0] - 1
        for j in range(flat.shape[0]):
            a = abs(flat[j])
            above += a > hi32
            band[min(filled, last)] = a
            filled += (a > lo32) & (a <= hi32)
        return above, filled

    @_jit
    def combine_row(
        d: np.ndarray,
        r: int,
        weights: np.ndarray,
        hi: np.ndarray,
        prune: bool,
        votes: np.ndarray,
        disjoint: bool,
        acc: np.ndarray,
        count: np.ndarray,
        out_row: np.ndarray,
        sq: np.ndarray,
    ) -> None:  # pragma: no cover - compiled
        """out_row = the combination of the rows d[i, r] (with ``prune``, entries with |x| <= hi[i] count
        as zero) under the sign ``votes``; sq[c] += out_row[c]² in float64.
        Per-column float64 sums keep this loop vectorized (a single running sum would serialize it)."""
        n = d.shape[0]
        zero = np.float32(0.0)
        one = np.float32(1.0)
        acc[:] = zero
        if disjoint:
            count[:] = zero
            for i in range(n):
                row = d[i, r]
                w, hi_i = weights[i], hi[i]
                for c in range(row.shape[0]):
                    x = row[c] if (abs(row[c]) > hi_i) | (not prune) else zero
                    agree = (x > zero) if votes[c] >= zero else (x < zero)
                    acc[c] += x * w if agree else zero
                    count[c] += one if agree else zero
            for c in range(out_row.shape[0]):
                v = acc[c] / max(count[c], one)
                out_row[c] = v
                sq[c] += np.float64(v) * np.float64(v)
        else:
            for i in range(n):
                row = d[i, r]
                w, hi_i = weights[i], hi[i]
                for c in range(row.shape[0]):
                    acc[c] += (row[c] if (abs(row[c]) > hi_i) | (not prune) else zero) * w
            for c in range(out_row.shape[0]):
                v = acc[c]
                out_row[c] = v
                sq[c] += np.float64(v) * np.float64(v)

    @_jit
    def add_votes(row: np.ndarray, votes: np.ndarray, frequency: bool) -> None:  # pragma: no cover - compiled
        """votes += row (frequency: += sign(row))."""
        zero = np.float32(0.0)
        one = np.float32(1.0)
        if frequency:
            for c in range(row.shape[0]):
                x = row[c]
                votes[c] += (one if x > zero else zero) - (one if x < zero else zero)
        else:
            for c in range(row.shape[0]):
                votes[c] += row[c]

    @_jit
    def merge_block(
        d: np.ndarray,
        weights: np.ndarray,
        prune: int,
        thresholds: np.ndarray,
        ties_left: np.ndarray,
        rng: np.ndarray,
        keep_below: np.uint64,
        density: float,
        disjoint: bool,
        frequency: bool,
        out: np.ndarray,
    ) -> float:  # pragma: no cover - compiled
        """Prune and combine the n dense blocks d[i] (rows × cols) into ``out``; return Σ out² (float64).
        ``d`` is overwritten with the pruned values.

        prune: magnitude keeps |x| > thresholds[i] plus the first ties_left[i] entries equal to it;
        random keeps x when the next draw of stream i is below ``keep_below`` and divides it by density.
        combine: Σ w_i p_i, or (disjoint) the sign of Σ p_i (frequency: of Σ sign p_i), ties +, then
        Σ w_i p_i over the agreeing non-zero p_i divided by max(1, their count).
        Loops run over a row's columns innermost, with selects instead of branches, so they vectorize.
        """
        n, rows, cols = d.shape
        zero = np.float32(0.0)
        dens = np.float32(density)
        votes = np.empty(cols, dtype=np.float32)
        acc = np.empty(cols, dtype=np.float32)
        count = np.empty(cols, dtype=np.float32)
        keep_a = np.empty(cols, dtype=np.bool_)
        keep_b = np.empty(cols, dtype=np.bool_)
        sq = np.zeros(cols, dtype=np.float64)
        for r in range(rows):
            votes[:] = zero
            if prune == 2:
                i = 0
                while i + 1 < n:
                    random_prune_pair(rng, i, d[i, r], d[i + 1, r], keep_below, dens, keep_a, keep_b)
                    i += 2
                if i < n:
                    random_prune_row(rng, i, d[i, r], keep_below, dens, keep_a)
            for i in range(n):
                row = d[i, r]
                if prune == 1:
                    th = thresholds[i]
                    hits = 0
                    if ties_left[i] > 0:  # the tie quota is spent in row-major order: find rows holding one
                        for c in range(cols):
                            hits += abs(row[c]) == th
                    if hits > 0:
                        for c in range(cols):
                            a = abs(row[c])
                            if a == th and ties_left[i] > 0:
                                ties_left[i] -= 1
                            elif not a > th:
                                row[c] = zero
                    else:
                        for c in range(cols):
                            row[c] = row[c] if abs(row[c]) > th else zero
                add_votes(row, votes, frequency)
            combine_row(d, r, weights, weights, False, votes, disjoint, acc, count, out[r], sq)
        return sq.sum()

    @_jit
    def random_prune_rows(
        d: np.ndarray,
        i: int,
        two: bool,
        rng: np.ndarray,
        keep_below: np.uint64,
        density: float,
        keep_a: np.ndarray,
        keep_b: np.ndarray,
    ) -> None:  # pragma: no cover - compiled
        """``merge_block``'s random prune of adapter i (and i + 1 with ``two``) alone, over every row of the
        block: streams are independent, so different adapters' masks can be drawn on different threads,
        each stream still in row order."""
        dens = np.float32(density)
        for r in range(d.shape[1]):
            if two:
                random_prune_pair(rng, i, d[i, r], d[i + 1, r], keep_below, dens, keep_a, keep_b)
            else:
                random_prune_row(rng, i, d[i, r], keep_below, dens, keep_a)

    @_jit
    def combine_rows(
        d: np.ndarray, weights: np.ndarray, disjoint: bool, frequency: bool, r0: int, r1: int, out: np.ndarray
    ) -> float:  # pragma: no cover - compiled
        """``merge_block``'s combination of already pruned blocks, for the rows [r0, r1): the rows of one
        block can be combined on different threads. Returns Σ out² over them.
        (Split by rows, not columns: a loop over a column range passed in does not vectorize.)"""
        n, _, cols = d.shape
        votes = np.empty(cols, dtype=np.float32)
        acc = np.empty(cols, dtype=np.float32)
        count = np.empty(cols, dtype=np.float32)
        sq = np.zeros(cols, dtype=np.float64)
        for r in range(r0, r1):
            votes[:] = np.float32(0.0)
            for i in range(n):
                add_votes(d[i, r], votes, frequency)
            combine_row(d, r, weights, weights, False, votes, disjoint, acc, count, out[r], sq)
        return sq.sum()

    @_jit
    def merge_block_banded(
        d: np.ndarray,
        weights: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        disjoint: bool,
        frequency: bool,
        out: np.ndarray,
        first: int,
        above: np.ndarray,
        def_idx: np.ndarray,
        def_vals: np.ndarray,
        n_def: int,
    ) -> tuple[float, int]:  # pragma: no cover - compiled
        """Magnitude prune and combine with the exact thresholds still unknown but bracketed: adapter i
        keeps |x| > hi[i] and drops |x| <= lo[i]; an entry with some |x_i| in (lo[i], hi[i]] is deferred:
        its flat index (``first`` + row-major offset) and its n values are appended to ``def_idx`` /
        ``def_vals`` (n × capacity) from ``n_def`` on, and ``out`` gets the merge with those values dropped (a
        provisional value that ``fix_deferred`` replaces). ``above[i]`` counts |x_i| > hi[i].
        Returns (Σ out², new n_def); an n_def beyond ``def_idx``'s size means it overflowed.
        Arithmetic per entry is that of ``merge_block``. One pass per adapter row counts, flags, votes
        and zeroes what lies below the band (a set-aside value at or below lo[i] is dropped whatever the
        threshold, so storing it as 0 changes nothing); the combination prunes at hi[i] on the fly."""
        n, rows, cols = d.shape
        zero = np.float32(0.0)
        one = np.float32(1.0)
        votes = np.empty(cols, dtype=np.float32)
        acc = np.empty(cols, dtype=np.float32)
        count = np.empty(cols, dtype=np.float32)
        flag = np.empty(cols, dtype=np.int32)
        sq = np.zeros(cols, dtype=np.float64)
        cap = def_idx.shape[0]
        for r in range(rows):
            flag[:] = 0
            votes[:] = zero
            deferred = 0
            for i in range(n):
                row = d[i, r]
                lo_i, hi_i = lo[i], hi[i]
                cnt = 0
                for c in range(cols):
                    x = row[c]
                    a = abs(x)
                    kept = a > hi_i
                    cnt += np.int32(1) if kept else np.int32(0)
                    inside = np.int32(1) if (a > lo_i) & (a <= hi_i) else np.int32(0)
                    flag[c] += inside
                    deferred += inside
                    p = x if kept else zero
                    sign = (one if p > zero else zero) - (one if p < zero else zero)
                    votes[c] += sign if frequency else p
                    row[c] = x if a > lo_i else zero
                above[i] += cnt
            for c in range(cols if deferred > 0 else 0):
                if flag[c] > 0:
                    if n_def < cap:
                        def_idx[n_def] = first + r * cols + c
                        for i in range(n):
                            def_vals[i, n_def] = d[i, r, c]
                    n_def += 1
            combine_row(d, r, weights, hi, True, votes, disjoint, acc, count, out[r], sq)
        return sq.sum(), n_def

    @_jit
    def band_values(
        def_vals: np.ndarray, n_def: int, i: int, lo: float, hi: float, buf: np.ndarray, filled: int
    ) -> int:  # pragma: no cover - compiled
        """Append the |x| in (lo, hi] among adapter i's first ``n_def`` set-aside values to ``buf`` from
        ``filled`` on; return the new fill (branch-free, as ``scan_band``)."""
        lo32, hi32 = np.float32(lo), np.float32(hi)
        last = buf.shape[0] - 1
        for j in range(n_def):
            a = abs(def_vals[i, j])
            buf[min(filled, last)] = a
            filled += (a > lo32) & (a <= hi32)
        return filled

    @_jit
    def sampled_magnitudes(
        bs: np.ndarray, at: np.ndarray, idx: np.ndarray, out: np.ndarray
    ) -> None:  # pragma: no cover - compiled
        """out[j] = |(Bs·A)[idx[j] // d_in, idx[j] % d_in]| = |Σ_r Bs[row, r]·Aᵀ[col, r]| (``at`` = Aᵀ)."""
        d_in, rank = at.shape
        for j in range(idx.shape[0]):
            row, col = idx[j] // d_in, idx[j] % d_in
            s = np.float32(0.0)
            for r in range(rank):
                s += bs[row, r] * at[col, r]
            out[j] = abs(s)

    @_jit
    def kth_largest(values: np.ndarray, k: int) -> tuple[float, int]:  # pragma: no cover - compiled
        """(v, g): v the k-th largest of ``values`` (1 <= k <= size), g how many values exceed it."""
        m = values.shape[0]
        v = np.partition(values, m - k)[m - k]
        greater = 0
        for j in range(m):
            greater += values[j] > v
        return v, greater

    @_jit
    def count_equal(def_vals: np.ndarray, n_def: int, i: int, value: float) -> int:  # pragma: no cover
        """How many of adapter i's first ``n_def`` set-aside values have |x| == value."""
        v32 = np.float32(value)
        hits = 0
        for j in range(n_def):
            hits += abs(def_vals[i, j]) == v32
        return hits

    @_jit
    def fix_deferred(
        def_idx: np.ndarray,
        def_vals: np.ndarray,
        n_def: int,
        weights: np.ndarray,
        thresholds: np.ndarray,
        ties_left: np.ndarray,
        disjoint: bool,
        frequency: bool,
        out: np.ndarray,
        omega: np.ndarray,
        y: np.ndarray,
        sketch: bool,
    ) -> float:  # pragma: no cover - compiled
        """Finish the entries ``merge_block_banded`` deferred, now that the exact thresholds and tie quotas
        are known: prune (keep |x| > th, then |x| == th while the quota lasts, in row-major order — every
        entry at a threshold lies in its band, so all are here, in order) and combine exactly as
        ``merge_block``; write into the flat ``out`` and, with ``sketch``, add (new − provisional)·Ω[c] to
        y[r] (Y = MΩ stays the sketch of the final M). Returns Σ (new² − provisional²) in float64.

        Chunks of entries are pruned and combined adapter by adapter with selects, so the loops vectorize
        (an entry at a time, every keep decision is a branch the predictor misses half the time); only
        the rare entries equal to a threshold take a scalar pass that spends the quota in order."""
        n = def_vals.shape[0]
        cols = omega.shape[0]
        width = omega.shape[1]
        zero = np.float32(0.0)
        one = np.float32(1.0)
        chunk = 1024
        p = np.empty((n, chunk), dtype=np.float32)
        votes = np.empty(chunk, dtype=np.float32)
        acc = np.empty(chunk, dtype=np.float32)
        count = np.empty(chunk, dtype=np.float32)
        delta = 0.0
        for j0 in range(0, n_def, chunk):
            m = min(chunk, n_def - j0)
            votes[:m] = zero
            for i in range(n):
                th = thresholds[i]
                vals = def_vals[i, j0 : j0 + m]
                kept = p[i, :m]
                for j in range(m):
                    x = vals[j]
                    kept[j] = x if abs(x) > th else zero
                if ties_left[i] > 0:
                    for j in range(m):
                        if abs(vals[j]) == th and ties_left[i] > 0:
                            ties_left[i] -= 1
                            kept[j] = vals[j]
                for j in range(m):
                    x = kept[j]
                    sign = (one if x > zero else zero) - (one if x < zero else zero)
                    votes[j] += sign if frequency else x
            acc[:m] = zero
            if disjoint:
                count[:m] = zero
                for i in range(n):
                    w = weights[i]
                    for j in range(m):
                        x = p[i, j]
                        agree = (x > zero) if votes[j] >= zero else (x < zero)
                        acc[j] += x * w if agree else zero
                        count[j] += one if agree else zero
                for j in range(m):
                    acc[j] = acc[j] / max(count[j], one)
            else:
                for i in range(n):
                    w = weights[i]
                    for j in range(m):
                        acc[j] += p[i, j] * w
            for j in range(m):
                v = acc[j]
                flat = def_idx[j0 + j]
                old = out[flat]
                out[flat] = v
                delta += float(v) * float(v) - float(old) * float(old)
                change = v - old
                if sketch and change != zero:
                    r, c = flat // cols, flat % cols
                    for t in range(width):
                        y[r, t] += change * omega[c, t]
        return delta
