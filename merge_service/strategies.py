"""Merge strategies: a registry of pure tensor functions.

Every strategy maps task tensors T_1..T_n (same shape) and weights w_1..w_n to one tensor.
Each declares beside its code which request parameters it reads, so validation, the merge key
and the CLI all ask the registry instead of repeating per-strategy rules.

Semantics (as in PEFT's merge_utils, with DARE rescaled and seeded):
- prune by magnitude: keep the top floor(density·numel) |values| of each tensor, zero the rest.
- prune at random (DARE): keep each value with probability density, divide survivors by density.
- majority sign over the unweighted pruned tensors: total = sign(Σ P_i), frequency = sign(Σ sign(P_i));
  a tie (0) counts as +.
- disjoint merge: Σ w_i P_i·m_i / max(1, Σ m_i), with m_i = [sign(P_i) == majority sign]; zeros never agree.

Random masks come from a counter-free, versioned bit stream: numpy's SFC64 generator seeded per
tensor (``tensor_seed``), one raw 64-bit draw per element in row-major order, kept when below
density·2⁶⁴. Raw SFC64 output is part of numpy's stability guarantee (unlike its distributions and
torch's generators), the stream can be consumed in blocks of any size with the same result, and it
runs on the CPU whatever the device: CPU and CUDA merges draw identical masks.

Each strategy is a prune step (``Prune``) and a combine step (``Combine``); the blocked dense merge
(``module_merge.py``) reads those two declarations.

A new strategy is one ``@register`` entry here plus its value in ``merge.proto``'s ``MergeStrategy``,
whose ``(strategy_params)`` option declares the same parameters for remote clients (a test checks that
the two agree). ``Strategy``, the enum the rest of the service uses, is built from this registry.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch


class SignMethod(StrEnum):
    TOTAL = "total"
    FREQUENCY = "frequency"


class Param(StrEnum):
    """The request parameters a strategy may read."""

    DENSITY = "density"
    SIGN_METHOD = "sign_method"
    SEED = "seed"


class Prune(StrEnum):
    NONE = "none"
    MAGNITUDE = "magnitude"  # keep the top floor(density·numel) |values|
    RANDOM = "random"  # DARE: keep with probability density, rescale by 1/density


class Combine(StrEnum):
    SUM = "sum"  # Σ w_i P_i
    DISJOINT = "disjoint"  # TIES sign election + disjoint mean


@dataclass(frozen=True)
class MergeParams:
    """The strategy parameters of one request, after validation and defaults."""

    density: float = 1.0
    sign_method: SignMethod = SignMethod.TOTAL
    seed: int = 0


# A merge function: (tensors, weights, params, seeds) -> merged tensor. ``seeds`` holds one
# seed per input tensor (random strategies only; see ``tensor_seed``).
MergeFn = Callable[[Sequence[torch.Tensor], Sequence[float], MergeParams, Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class StrategyDef:
    name: str
    fn: MergeFn
    params: frozenset[Param]  # the request parameters it reads
    prune: Prune
    combine: Combine
    doc: str

    @property
    def linear(self) -> bool:
        """Σ w_i T_i exactly: delta space may merge by rank concatenation, no dense matrix."""
        return self.prune == Prune.NONE and self.combine == Combine.SUM

    @property
    def uses_density(self) -> bool:
        return Param.DENSITY in self.params

    @property
    def uses_sign_method(self) -> bool:
        return Param.SIGN_METHOD in self.params

    @property
    def random(self) -> bool:
        return Param.SEED in self.params


REGISTRY: dict[str, StrategyDef] = {}


def register(
    name: str, *, params: Sequence[Param] = (), prune: Prune = Prune.NONE, combine: Combine = Combine.SUM
) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        REGISTRY[name] = StrategyDef(
            name,
            fn,
            frozenset(map(Param, params)),
            Prune(prune),
            Combine(combine),
            (fn.__doc__ or "").strip(),
        )
        return fn

    return deco


def get(name: str) -> StrategyDef:
    """The registered strategy ``name``; KeyError when unknown (spec validation reports it first)."""
    return REGISTRY[str(name)]


# ---------------------------------------------------------------------------------------------
# Building blocks


def keep_count(numel: int, density: float) -> int:
    """k = floor(density·numel) (PEFT's rounding)."""
    return min(numel, math.floor(density * numel))


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """P = T with all but the top k = floor(density·numel) |values| zeroed.

    The threshold comes from a k-th order statistic (linear time, unlike a full top-k);
    values equal to the threshold are kept first-by-index until exactly k survive.
    """
    n = t.numel()
    k = keep_count(n, density)
    if k >= n:
        return t.clone()
    if k <= 0:
        return torch.zeros_like(t)
    mag = t.abs().reshape(-1)
    thr = torch.kthvalue(mag, n - k + 1).values
    keep = mag > thr
    short = k - int(keep.sum())
    if short > 0:
        ties = torch.nonzero(mag == thr).squeeze(1)[:short]
        keep[ties] = True
    return (t.reshape(-1) * keep).reshape(t.shape)


def tensor_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for one tensor: sha256 of the request seed and labels (module, adapter, factor).

    Seeding each tensor on its own makes masks independent of module order and adapter order.
    """
    text = "\x1f".join([str(seed), *map(str, labels)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class MaskStream:
    """Bernoulli(density) decisions for consecutive elements of one tensor, in row-major order.

    Element j is kept when the j-th raw 64-bit output of SFC64(seed) is below floor(density·2⁶⁴);
    ``take(n)`` continues where the last call stopped, so any blocking yields the same mask.
    """

    def __init__(self, seed: int, density: float) -> None:
        self._bits = np.random.SFC64(seed)
        self._threshold = np.uint64(min(math.floor(density * 2.0**64), 2**64 - 1))

    def take(self, n: int) -> torch.Tensor:
        raw = self._bits.random_raw(n)
        return torch.from_numpy(raw < self._threshold)


def bernoulli_mask(
    shape: torch.Size | Sequence[int], density: float, seed: int, device: torch.device
) -> torch.Tensor:
    """A bool mask of ``shape`` with P(True) = density, from ``MaskStream(seed, density)``."""
    n = math.prod(shape)
    return MaskStream(seed, density).take(n).reshape(tuple(shape)).to(device)


def dare_prune_tensor(t: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """P = T·Bernoulli(density)/density: random drop with the expectation preserved (E[P] = T)."""
    if density >= 1.0:
        return t.clone()
    mask = bernoulli_mask(t.shape, density, seed, t.device)
    return t * mask / density


def majority_sign(pruned: torch.Tensor, method: SignMethod) -> torch.Tensor:
    """Elected sign per entry of stacked tensors (n, ...): total = sign Σ P_i, frequency = sign Σ sign P_i;
    ties give +1."""
    votes = pruned.sum(dim=0) if method == SignMethod.TOTAL else pruned.sign().sum(dim=0)
    return torch.where(votes >= 0, 1.0, -1.0).to(pruned.dtype)


def disjoint_merge(pruned: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Σ w_i P_i·m_i / max(1, Σ m_i) with m_i = [sign(P_i) == sign]: the mean over agreeing entries."""
    agree = pruned.sign() == sign
    w = weights.to(pruned.dtype).reshape(-1, *([1] * (pruned.dim() - 1)))
    total = (pruned * w * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i T_i, accumulated in the given order (callers fix the order for reproducible bytes).
    Each w_i T_i is rounded before it is added (``add_(t, alpha=w)`` fuses the two into one rounding
    on some CPUs), so the result is the fused CPU kernel's to the bit on any device."""
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t * w)
    return out


def _ties_merge(pruned: Sequence[torch.Tensor], weights: Sequence[float], method: SignMethod) -> torch.Tensor:
    stacked = torch.stack(list(pruned))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return disjoint_merge(stacked, w, majority_sign(stacked, method))


# ---------------------------------------------------------------------------------------------
# Strategies


@register("linear")
def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: MergeParams, seeds: Sequence[int]
) -> torch.Tensor:
    """Task arithmetic: Σ w_i T_i."""
    return weighted_sum(tensors, weights)


@register("magnitude_prune", params=(Param.DENSITY,), prune=Prune.MAGNITUDE)
def magnitude_prune(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: MergeParams, seeds: Sequence[int]
) -> torch.Tensor:
    """Σ w_i P_i with P_i = T_i keeping its top floor(density·numel) magnitudes."""
    return weighted_sum([magnitude_prune_tensor(t, params.density) for t in tensors], weights)


@register("ties", params=(Param.DENSITY, Param.SIGN_METHOD), prune=Prune.MAGNITUDE, combine=Combine.DISJOINT)
def ties(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: MergeParams, seeds: Sequence[int]
) -> torch.Tensor:
    """TIES: magnitude-pruned P_i, sign elected from the unweighted P_i, disjoint weighted mean."""
    pruned = [magnitude_prune_tensor(t, params.density) for t in tensors]
    return _ties_merge(pruned, weights, params.sign_method)


@register("dare_linear", params=(Param.DENSITY, Param.SEED), prune=Prune.RANDOM)
def dare_linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: MergeParams, seeds: Sequence[int]
) -> torch.Tensor:
    """DARE: Σ w_i T_i·Bernoulli(density)/density, masks seeded per tensor."""
    pruned = [dare_prune_tensor(t, params.density, s) for t, s in zip(tensors, seeds, strict=True)]
    return weighted_sum(pruned, weights)


@register(
    "dare_ties",
    params=(Param.DENSITY, Param.SIGN_METHOD, Param.SEED),
    prune=Prune.RANDOM,
    combine=Combine.DISJOINT,
)
def dare_ties(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], params: MergeParams, seeds: Sequence[int]
) -> torch.Tensor:
    """DARE-TIES: the DARE P_i, then the TIES sign election and disjoint weighted mean."""
    pruned = [dare_prune_tensor(t, params.density, s) for t, s in zip(tensors, seeds, strict=True)]
    return _ties_merge(pruned, weights, params.sign_method)


# The strategy names as an enum (Strategy.TIES == "ties"), made from the registry above: the names are
# written once, in the @register lines.
Strategy = StrEnum("Strategy", {name.upper(): name for name in REGISTRY})  # type: ignore[misc]
