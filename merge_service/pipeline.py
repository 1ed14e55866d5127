"""The merge as the service and the CLI see it: plan (cheap, no tensors) then build (blocking).

``Merger.plan`` validates the spec, resolves every adapter to pinned local files, reads the configs
and the safetensors headers (shapes, not tensors), checks that the adapters can be merged, picks the
output rank and computes the merge key. ``Merger.build`` loads the factors and merges module by
module (one dense d_out×d_in matrix at a time at most), on CUDA when present with device="auto".

Adapters are merged in a canonical order (content digest, then weight), the same order the merge
key sorts them in, so a permuted request gives the same key and the same bytes.

Reproducibility: the same plan gives byte-identical output on the same kind of device and software
stack. DARE masks and SVD sketches are drawn on the CPU whatever the device, so CPU and CUDA merges
prune the same entries; their matmuls and SVDs still round differently, so their bytes may differ in
the last bits (the merge key does not name the device).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from loramerge.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, shown
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service import strategies
from merge_service.adapter import (
    AdapterConfig,
    LoraAdapter,
    LoraModule,
    all_finite,
    check_structure,
    load_adapter,
    read_config,
    read_safetensors_header,
)
from merge_service.estimate import ModuleWork, estimate_build_seconds
from merge_service.identity import ALGORITHM_VERSION, canonical, derived_seed, encode, merge_key
from merge_service.merged import MergedAdapter, ModuleStat
from merge_service.module_merge import Workspace, linear_factors_into, merge_module, pad_rank
from merge_service.output import (
    SIDECAR_FILE,
    TORCH_DTYPES,
    adapter_config,
    config_json,
    tensor_names,
)
from merge_service.safetensors_file import SafetensorsFile, TensorEntry
from merge_service.sources.base import ResolvedSource
from merge_service.spec import AdapterRef, MergeSpec, Space
from merge_service.strategies import MergeParams
from merge_service.threads import intra_op_threads

__all__ = ["Merger", "ModuleShape", "Plan", "SourceResolver"]

Progress = Callable[[str, int, int], None]


class SourceResolver(Protocol):
    def resolve(self, ref: AdapterRef, field: str = "adapter") -> ResolvedSource: ...


@dataclass(frozen=True)
class ModuleShape:
    """A module of the merge: its shape and each adapter's rank for it (0: the adapter lacks it)."""

    name: str
    d_out: int
    d_in: int
    ranks: tuple[int, ...]  # in spec.adapters order


@dataclass(frozen=True)
class Plan:
    spec: MergeSpec  # effective spec (defaults applied, seed filled in)
    sources: tuple[ResolvedSource, ...]  # in spec.adapters order
    merge_key: str  # hex sha256
    rank: int  # output rank
    estimated_bytes: int
    base_model: str
    modules: tuple[ModuleShape, ...] = ()
    order: tuple[int, ...] = ()  # canonical merge order: indices into spec.adapters
    task_type: str | None = None
    input_bytes: int = 0
    # The configs the plan read (spec.adapters order): callers reuse them instead of reading the files
    # again (a second read could see other content, and would lose the spec's field names).
    configs: tuple[AdapterConfig, ...] = ()


def pick_device(device: str) -> str:
    """ "auto" → "cuda" when a GPU answers, else "cpu"; anything else is checked and returned."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(
            f"device {device!r} asked for but no CUDA device is available", field="device"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidArgument(f"device must be auto, cpu or cuda[:N], got {device!r}", field="device")
    return device


# Below this many elements per module, intra-op threads cost more than they give (and oversubscribed
# cores make LAPACK's OpenMP barriers very slow); torch's thread count is per calling thread.
SMALL_MODULE_ELEMENTS = 1 << 20


def _read_shapes(src: ResolvedSource, config: AdapterConfig, fld: str) -> dict[str, tuple[int, int, int]]:
    """{module: (rank, d_out, d_in)} from the safetensors header alone."""
    path = src.path / WEIGHTS_FILE
    with open(path, "rb") as f:
        infos, _ = read_safetensors_header(f, os.fstat(f.fileno()).st_size, src.id, fld)
    pairs = check_structure(infos, config, src.id, fld)
    return {m: (infos[a].shape[0], infos[b].shape[0], infos[a].shape[1]) for m, (a, b) in pairs.items()}


def _file_bytes(src: ResolvedSource) -> int:
    if getattr(src, "nbytes", 0):
        return src.nbytes
    return sum((src.path / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE))


def _output_rank(spec: MergeSpec, modules: tuple[ModuleShape, ...]) -> int:
    """The output rank: target_rank when given (never above what is exact), else the default — delta
    linear: Σ r_i (exact); other delta strategies: Σ r_i (the size of the inputs; the dense merge is
    full rank and is truncated to it); factors: r — capped by max_rank (compressing)."""
    if spec.space == Space.FACTORS:
        default = exact = max(max(m.ranks) for m in modules)
    else:
        default = max(sum(m.ranks) for m in modules)
        linear = strategies.get(spec.strategy).linear
        exact = default if linear else max(min(m.d_out, m.d_in) for m in modules)
    if spec.target_rank:
        return min(spec.target_rank, exact)
    return min(default, spec.max_rank) if spec.max_rank else default


# Adapters resolved at once by one plan: hub and S3 sources wait on the network, local ones hash files.
RESOLVE_THREADS = 4


class Merger:
    def __init__(self, resolver: SourceResolver, device: str = "auto", max_input_bytes: int | None = None):
        self.resolver = resolver
        self.device = device
        self.max_input_bytes = max_input_bytes

    # ------------------------------------------------------------------------------------- plan
    def plan(self, spec: MergeSpec) -> Plan:
        """Validate, resolve sources, read configs and headers, pick the rank, compute the key."""
        spec.validate()
        spec = spec.normalized()
        fields = [f"spec.adapters[{i}]" for i in range(len(spec.adapters))]
        sources = self._resolve(spec.adapters, fields)
        configs = [read_config(src.path, src.id, fld) for src, fld in zip(sources, fields, strict=True)]

        input_bytes = sum(_file_bytes(src) for src in sources)
        if self.max_input_bytes is not None and input_bytes > self.max_input_bytes:
            raise ResourceExhausted(
                f"spec.adapters: the adapters hold {input_bytes} bytes, more than the {self.max_input_bytes} "
                "allowed per merge",
                field="spec.adapters",
            )
        base_model = self._common_base(spec, configs)
        modules = self._modules(spec, sources, configs, fields)
        rank = _output_rank(spec, modules)
        if spec.max_rank and rank > spec.max_rank:
            raise FailedPrecondition(
                f"the merged adapter would have rank {rank}, above max_rank {spec.max_rank}",
                field="spec.max_rank",
            )
        digests = [src.digest for src in sources]
        if strategies.get(spec.strategy).random and spec.seed is None:
            spec = replace(spec, seed=derived_seed(spec, digests, rank))
        order = tuple(sorted(range(len(sources)), key=lambda i: (digests[i], spec.adapters[i].weight, i)))
        itemsize = torch.tensor([], dtype=TORCH_DTYPES[spec.dtype]).element_size()
        data_bytes = sum(rank * (m.d_in + m.d_out) * itemsize for m in modules)
        header_bytes = 16 + sum(2 * (len(m.name) + 100) for m in modules)
        return Plan(
            spec=spec,
            sources=sources,
            merge_key=merge_key(spec, digests, rank),
            rank=rank,
            estimated_bytes=data_bytes + header_bytes,
            base_model=base_model,
            modules=modules,
            order=order,
            task_type=next((c.raw.get("task_type") for c in configs if c.raw.get("task_type")), None),
            input_bytes=input_bytes,
            configs=tuple(configs),
        )

    def _resolve(self, refs: tuple[AdapterRef, ...], fields: list[str]) -> tuple[ResolvedSource, ...]:
        """Resolve the adapters concurrently (downloads and content hashing release the GIL); an error
        is the first failing adapter's in spec order."""
        if len(refs) < 2:
            return tuple(self.resolver.resolve(ref, field=fld) for ref, fld in zip(refs, fields, strict=True))
        with ThreadPoolExecutor(min(len(refs), RESOLVE_THREADS), thread_name_prefix="resolve") as pool:
            return tuple(pool.map(lambda ref, fld: self.resolver.resolve(ref, field=fld), refs, fields))

    def estimate_seconds(self, plan: Plan) -> float:
        """Estimated seconds to build ``plan`` here (``estimate.estimate_build_seconds``)."""
        strategy = strategies.get(plan.spec.strategy)
        device = (
            "cuda"
            if self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        return estimate_build_seconds(
            [ModuleWork(m.d_out, m.d_in, m.ranks) for m in plan.modules],
            linear=strategy.linear,
            factors=plan.spec.space == Space.FACTORS,
            rank=plan.rank,
            input_bytes=plan.input_bytes,
            output_bytes=plan.estimated_bytes,
            device=device,
        )

    @staticmethod
    def _common_base(spec: MergeSpec, configs: list[AdapterConfig]) -> str:
        named = {c.base_model for c in configs if c.base_model}
        if len(named) > 1:
            listing = ", ".join(
                f"{shown(ref.id)}: {shown(c.base_model)}"
                for ref, c in zip(spec.adapters, configs, strict=True)
            )
            raise FailedPrecondition(
                f"spec.adapters: all adapters must be trained on the same base model, got {listing}",
                field="spec.adapters",
            )
        return named.pop() if named else ""

    @staticmethod
    def _modules(
        spec: MergeSpec, sources: tuple[ResolvedSource, ...], configs: list[AdapterConfig], fields: list[str]
    ) -> tuple[ModuleShape, ...]:
        shapes = [_read_shapes(src, cfg, fld) for src, cfg, fld in zip(sources, configs, fields, strict=True)]
        names = sorted(set().union(*shapes))
        out = []
        for name in names:
            dims = {(s[name][1], s[name][2]) for s in shapes if name in s}
            if len(dims) > 1:
                listing = ", ".join(
                    f"{shown(src.id)}: {list(s[name][1:])}"
                    for src, s in zip(sources, shapes, strict=True)
                    if name in s
                )
                raise InvalidArgument(
                    f"spec.adapters: module {shown(name)} has different shapes (d_out, d_in) across "
                    "adapters: "
                    f"{listing}; they cannot share one base model",
                    field="spec.adapters",
                )
            ranks = tuple(s[name][0] if name in s else 0 for s in shapes)
            if spec.space == Space.FACTORS and len({r for r in ranks if r}) > 1:
                listing = ", ".join(
                    f"{shown(src.id)}: {r}" for src, r in zip(sources, ranks, strict=True) if r
                )
                raise InvalidArgument(
                    f"spec.space: space=factors needs equal ranks, but module {shown(name)} has "
                    f"ranks {listing}; "
                    "use space=delta, which merges adapters of any ranks exactly",
                    field="spec.space",
                )
            d_out, d_in = dims.pop()
            out.append(ModuleShape(name, d_out, d_in, ranks))
        return tuple(out)

    # ------------------------------------------------------------------------------------ build
    def build(self, plan: Plan, progress: Progress | None = None) -> MergedAdapter:
        """Load the adapters and merge module by module. Same plan ⇒ byte-identical ``data``."""
        t0 = time.perf_counter()
        device = pick_device(self.device)
        spec = plan.spec
        order = plan.order or tuple(range(len(plan.sources)))
        if progress:
            progress("load", 0, len(order))
        adapters: list[LoraAdapter] = []
        for n, i in enumerate(order):
            adapters.append(
                load_adapter(plan.sources[i], device, field=f"spec.adapters[{i}]", keep_16bit=True)
            )
            if progress:
                progress("load", n + 1, len(order))
        weights = [spec.adapters[i].weight for i in order]
        keys = _adapter_keys([plan.sources[i].digest for i in order])

        small = device == "cpu" and max(m.d_out * m.d_in for m in plan.modules) <= SMALL_MODULE_ELEMENTS
        canonical_spec = encode(canonical(spec, [src.digest for src in plan.sources], plan.rank)).decode()
        metadata = {"loramerge.merge_key": plan.merge_key, "loramerge.canonical_spec": canonical_spec}
        # The file is laid out from the plan and each module written into its place as it is merged.
        with (
            SafetensorsFile(output_entries(plan), metadata, hash_thread=torch.get_num_threads() > 1) as out,
            intra_op_threads(1 if small else None),
        ):
            stats = self._merge_modules(plan, adapters, weights, keys, out, progress)
            del adapters
            data, sha256 = out.finish()
        config = adapter_config(
            rank=plan.rank,
            modules=[m.name for m in plan.modules],
            base_model=plan.base_model,
            task_type=plan.task_type,
        )
        return MergedAdapter(
            merge_key=plan.merge_key,
            config_json=config_json(config),
            data=data,
            sha256=sha256,
            rank=plan.rank,
            modules=tuple(stats),
            base_model=plan.base_model,
            build_seconds=time.perf_counter() - t0,
            device=device,
            record_json=json.dumps(self.record(plan), indent=2, sort_keys=True) + "\n",
        )

    def _merge_modules(
        self,
        plan: Plan,
        adapters: list[LoraAdapter],
        weights: list[float],
        keys: list[str],
        out: SafetensorsFile,
        progress: Progress | None,
    ) -> list[ModuleStat]:
        spec = plan.spec
        strategy = strategies.get(spec.strategy)
        params = MergeParams(
            density=spec.density if spec.density is not None else 1.0,
            sign_method=spec.sign_method,
            seed=spec.seed or 0,
        )
        workspace = Workspace()
        # Rank concatenation that keeps every rank: the merged factors are the inputs, scaled.
        exact_concat = (
            spec.space == Space.DELTA
            and strategy.linear
            and all(plan.rank >= sum(m.ranks) for m in plan.modules)
        )
        stats: list[ModuleStat] = []
        for n, shape in enumerate(plan.modules):
            # Taken out of the adapters: each input module is freed once merged (peak RSS ≈ inputs + output).
            # 16-bit inputs are widened to float32 here, one module at a time.
            parts = [a.modules.pop(shape.name, None) for a in adapters]
            self._check_loaded(shape, parts, adapters)
            name_a, name_b = tensor_names(shape.name)
            A_out, B_out = out.slot(name_a), out.slot(name_b)
            if exact_concat and B_out.dtype == torch.float32:
                # Straight from the 16-bit inputs into the file: no float32 copy of the inputs, no result
                # tensors (the bytes are the same as the general path's).
                present = [(p, w) for p, w in zip(parts, weights, strict=True) if p is not None]
                with torch.no_grad():
                    r = linear_factors_into([p for p, _ in present], [w for _, w in present], B_out, A_out)
                check_representable(spec, shape.name, B_out, A_out, B_out, A_out)
                out.filled(name_a)
                out.filled(name_b)
                stats.append(ModuleStat(shape.name, r, 0.0))
                if progress:
                    progress("merge", n + 1, len(plan.modules))
                continue
            parts = [p.float32() if p is not None else None for p in parts]
            with torch.no_grad():
                try:
                    result = merge_module(
                        shape.name, parts, weights, keys, strategy, params, spec.space, plan.rank, workspace
                    )
                except torch.linalg.LinAlgError as e:  # a dense merge that overflowed float32 has no SVD
                    if "non-finite" not in str(e):
                        raise
                    raise overflow_error(spec, shape.name, "the merged update ΔW", None) from e
                B, A = pad_rank(result, plan.rank)
            A_out.copy_(A)
            B_out.copy_(B)
            check_representable(spec, shape.name, B, A, B_out, A_out)
            out.filled(name_a)
            out.filled(name_b)
            stats.append(ModuleStat(shape.name, result.rank, float(result.relative_error)))
            if progress:
                progress("merge", n + 1, len(plan.modules))
        return stats

    @staticmethod
    def _check_loaded(
        shape: ModuleShape, parts: list[LoraModule | None], adapters: list[LoraAdapter]
    ) -> None:
        """The files may have changed between plan and build: refuse to key different content."""
        for p, a in zip(parts, adapters, strict=True):
            if p is not None and (p.B.shape[0], p.A.shape[1]) != (shape.d_out, shape.d_in):
                raise FailedPrecondition(
                    f"adapter {shown(a.id)} changed while merging: module {shown(shape.name)} is now "
                    f"{list(p.B.shape)}×{list(p.A.shape)}",
                    field="spec.adapters",
                )

    @staticmethod
    def record(plan: Plan) -> dict:
        """What the merged adapter's config records about how it was made."""
        spec = plan.spec
        return {
            "merge_key": plan.merge_key,
            "algorithm_version": ALGORITHM_VERSION,
            "request": {
                "adapters": [
                    {"id": src.id, "revision": src.revision, "digest": src.digest, "weight": ref.weight}
                    for ref, src in zip(spec.adapters, plan.sources, strict=True)
                ],
                "strategy": str(spec.strategy),
                "density": spec.density,
                "majority_sign_method": str(spec.sign_method),
                "seed": spec.seed,
                "space": str(spec.space),
                "target_rank": spec.target_rank,
                "max_rank": spec.max_rank,
                "dtype": str(spec.dtype),
            },
            "rank": plan.rank,
        }


def overflow_error(spec: MergeSpec, module: str, what: str, peak: float | None) -> InvalidArgument:
    """The error for a merge whose ``what`` (of ``module``) holds values up to ``peak`` (None: not finite
    even in float32): the dtype is named when float32 would hold them, else the heaviest adapter's weight."""
    heaviest = max(range(len(spec.adapters)), key=lambda i: abs(spec.adapters[i].weight))
    weight, value = f"spec.adapters[{heaviest}].weight", spec.adapters[heaviest].weight
    f32_max = torch.finfo(torch.float32).max
    if peak is not None and peak <= f32_max:
        limit = torch.finfo(TORCH_DTYPES[spec.dtype]).max
        return InvalidArgument(
            f"spec.dtype {spec.dtype}: module {shown(module)}: {what} holds values up to "
            f"{peak:.4g}, beyond the "
            f"largest {spec.dtype} value {limit:.6g}; lower the adapters' weights (the largest is {weight} "
            f"= {value:g}) or use float32",
            field="spec.dtype",
        )
    values = "overflows float32" if peak is None else f"holds values up to {peak:.4g}, beyond float32"
    return InvalidArgument(
        f"{weight} = {value:g}: module {shown(module)}: {what} {values} (largest value {f32_max:.6g}); "
        "lower the adapters' weights",
        field=weight,
    )


def product_peak(B: torch.Tensor, A: torch.Tensor, limit: float, block_elements: int = 1 << 20) -> float:
    """max |(B·A)_ij| in float64 if it may exceed ``limit``, else a bound at most ``limit``.

    |(B·A)_ij| <= ||B_i,:||·||A_:,j|| (Cauchy-Schwarz) bounds it cheaply; only when that bound is
    above ``limit`` is B·A formed, a block of rows at a time. The bound is tried in float32 first (with
    a margin for its rounding): converting the factors to float64 costs more than the whole check."""
    col_a = A.square().sum(dim=0).max().sqrt()  # a column norm over dim 0 is 10× slower as vector_norm
    bound32 = float(torch.linalg.vector_norm(B, dim=1).max() * col_a)
    if math.isfinite(bound32) and bound32 * (1 + 1e-4) <= limit:
        return bound32 * (1 + 1e-4)
    B, A = B.double(), A.double()
    bound = float(torch.linalg.vector_norm(B, dim=1).max() * torch.linalg.vector_norm(A, dim=0).max())
    if bound <= limit:
        return bound
    rows = max(1, block_elements // max(1, A.shape[1]))
    return max(float((B[i : i + rows] @ A).abs().max()) for i in range(0, B.shape[0], rows))


def output_entries(plan: Plan) -> list[TensorEntry]:
    """The merged file's tensors: each module's A (rank, d_in) and B (d_out, rank) in the output dtype."""
    dtype = TORCH_DTYPES[plan.spec.dtype]
    entries = []
    for m in plan.modules:
        name_a, name_b = tensor_names(m.name)
        entries += [
            TensorEntry(name_a, dtype, (plan.rank, m.d_in)),
            TensorEntry(name_b, dtype, (m.d_out, plan.rank)),
        ]
    return entries


def check_representable(
    spec: MergeSpec, module: str, B: torch.Tensor, A: torch.Tensor, B_out: torch.Tensor, A_out: torch.Tensor
) -> None:
    """Refuse (InvalidArgument) merged factors, or an update ΔW = B·A, that the output dtype cannot hold.

    Finite weights can still overflow: float16 ends at 65504, and float32 at 3.4e38. ``B``, ``A``: the
    merged factors in float32; ``B_out``, ``A_out``: the same cast to the output dtype."""
    if not (all_finite(B) and all_finite(A)):
        raise overflow_error(spec, module, "a merged factor", None)
    # A float32 output is B and A themselves: already checked.
    if B_out.dtype != B.dtype and not (all_finite(B_out) and all_finite(A_out)):
        peak = max(float(B.abs().max()), float(A.abs().max()))
        raise overflow_error(spec, module, "a merged factor", peak)
    limit = torch.finfo(B_out.dtype).max
    peak = product_peak(B, A, limit)
    if peak > limit:
        raise overflow_error(spec, module, "the merged update ΔW = B·A", peak)


def _adapter_keys(digests: list[str]) -> list[str]:
    """Stable per-adapter labels for seeding: the digest, with an occurrence count for repeats."""
    seen: dict[str, int] = {}
    out = []
    for d in digests:
        out.append(f"{d}#{seen.get(d, 0)}")
        seen[d] = seen.get(d, 0) + 1
    return out


def load_record(path: Path) -> dict:
    """The record (sidecar ``loramerge.json``) of a merged adapter directory."""
    return json.loads((Path(path) / SIDECAR_FILE).read_text())
