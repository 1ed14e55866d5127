"""Protobuf messages ⇄ domain types (merge_service/spec.py, the merge plan).

Structural checks live here, because only here do the wire's shapes exist: LoRAX's ``ids``/``weights``
shorthand (parallel lists), both forms at once, enum values this build does not know, non-finite
numbers. Errors name the request field, e.g. "spec.weights" or "spec.adapters[1].weight".
Strategy rules (density required and in (0, 1], ...) are the merge domain's.

Floats arrive as float32; each is turned into the shortest decimal that rounds to the same float32
(0.3f -> 0.3), so a spec sent over gRPC gets the same merge key and bytes as the same spec given
to the offline CLI as decimal text.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any, TypeVar

from loramerge.errors import InvalidArgument, ResourceExhausted, shown
from loramerge.v1 import merge_pb2
from merge_service.spec import AdapterRef, Dtype, MergeSpec, SignMethod, SourceKind, Space, Strategy

E = TypeVar("E", SourceKind, Strategy, SignMethod, Space, Dtype)

# Proto enum type, domain enum, domain value for UNSPECIFIED.
_SOURCE = (merge_pb2.AdapterSource, SourceKind, SourceKind.AUTO)
_STRATEGY = (merge_pb2.MergeStrategy, Strategy, Strategy.LINEAR)
_SIGN = (merge_pb2.MajoritySignMethod, SignMethod, SignMethod.TOTAL)
_SPACE = (merge_pb2.MergeSpace, Space, Space.DELTA)
_DTYPE = (merge_pb2.Dtype, Dtype, Dtype.FLOAT32)


def float32_to_decimal(x: float) -> float:
    """The shortest decimal (as a Python float) whose float32 rounding is the float32 ``x``."""
    if not math.isfinite(x):
        return x
    f32 = struct.unpack("<f", struct.pack("<f", x))[0]
    for digits in range(1, 10):
        candidate = float(f"{f32:.{digits}g}")
        try:
            if struct.unpack("<f", struct.pack("<f", candidate))[0] == f32:
                return candidate
        except OverflowError:  # rounding near float32's max went past it
            continue
    return f32


def _enum_in(table: tuple[Any, type[E], E], value: int, field: str) -> E:
    proto_enum, domain, default = table
    if value == 0:
        return default
    try:
        name = proto_enum.Name(value)
    except ValueError:
        known = ", ".join(v.name for v in proto_enum.DESCRIPTOR.values if v.number != 0)
        raise InvalidArgument(f"{field} has unknown value {value}; use one of {known}", field=field) from None
    return domain[name]


def _enum_out(table: tuple[Any, type[E], E], value: E) -> int:
    proto_enum, _, default = table
    if value == default and value.name not in proto_enum.DESCRIPTOR.values_by_name:
        return 0
    return proto_enum.Value(value.name)


def _finite(x: float, field: str) -> float:
    value = float32_to_decimal(x)
    if not math.isfinite(value):
        raise InvalidArgument(f"{field} must be a finite number, got {x}", field=field)
    return value


def spec_from_proto(msg: merge_pb2.MergeSpec, *, prefix: str = "spec", max_adapters: int = 0) -> MergeSpec:
    """The domain MergeSpec of a request; ``prefix`` is the message's field path for error messages
    (the inference service embeds a MergeSpec as "merged_adapters"). ``max_adapters`` > 0 caps the
    number of adapters (ResourceExhausted)."""
    if msg.adapters and (msg.ids or msg.weights):
        raise InvalidArgument(
            f"{prefix}.adapters and {prefix}.ids/{prefix}.weights are two ways to name the adapters; "
            f"use one, got {len(msg.adapters)} adapters and {len(msg.ids)} ids",
            field=f"{prefix}.ids",
        )
    if msg.weights and len(msg.weights) != len(msg.ids):
        raise InvalidArgument(
            f"{prefix}.weights must be parallel to {prefix}.ids: got {len(msg.weights)} weights "
            f"for {len(msg.ids)} ids",
            field=f"{prefix}.weights",
        )
    count = len(msg.adapters) or len(msg.ids)
    if count == 0:
        raise InvalidArgument(
            f"{prefix}.adapters must name at least one adapter (or use {prefix}.ids), got none",
            field=f"{prefix}.adapters",
        )
    if max_adapters and count > max_adapters:
        raise ResourceExhausted(
            f"{prefix}.adapters names {count} adapters, more than the {max_adapters} allowed per request",
            field=f"{prefix}.adapters",
        )

    refs: list[AdapterRef] = []
    if msg.adapters:
        for i, a in enumerate(msg.adapters):
            path = f"{prefix}.adapters[{i}]"
            refs.append(
                AdapterRef(
                    id=_adapter_id(a.id, f"{path}.id"),
                    source=_enum_in(_SOURCE, a.source, f"{path}.source"),
                    revision=a.revision,
                    weight=_finite(a.weight, f"{path}.weight") if a.HasField("weight") else 1.0,
                )
            )
    else:
        for i, adapter_id in enumerate(msg.ids):
            weight = _finite(msg.weights[i], f"{prefix}.weights[{i}]") if msg.weights else 1.0
            refs.append(AdapterRef(id=_adapter_id(adapter_id, f"{prefix}.ids[{i}]"), weight=weight))

    return MergeSpec(
        adapters=tuple(refs),
        strategy=_enum_in(_STRATEGY, msg.merge_strategy, f"{prefix}.merge_strategy"),
        density=_finite(msg.density, f"{prefix}.density") if msg.HasField("density") else None,
        sign_method=_enum_in(_SIGN, msg.majority_sign_method, f"{prefix}.majority_sign_method"),
        seed=msg.seed if msg.HasField("seed") else None,
        space=_enum_in(_SPACE, msg.space, f"{prefix}.space"),
        target_rank=msg.target_rank,
        dtype=_enum_in(_DTYPE, msg.dtype, f"{prefix}.dtype"),
        max_rank=msg.max_rank,
    )


def _adapter_id(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument(f"{field} must name an adapter, got {shown(value)}", field=field)
    return value


def spec_to_proto(spec: MergeSpec) -> merge_pb2.MergeSpec:
    """A MergeSpec message with every field explicit (adapters, never the ids shorthand)."""
    msg = merge_pb2.MergeSpec(
        adapters=[
            merge_pb2.AdapterRef(
                id=a.id, source=_enum_out(_SOURCE, a.source), revision=a.revision, weight=a.weight
            )
            for a in spec.adapters
        ],
        merge_strategy=_enum_out(_STRATEGY, spec.strategy),
        majority_sign_method=_enum_out(_SIGN, spec.sign_method),
        space=_enum_out(_SPACE, spec.space),
        target_rank=spec.target_rank,
        dtype=_enum_out(_DTYPE, spec.dtype),
        max_rank=spec.max_rank,
    )
    if spec.density is not None:
        msg.density = spec.density
    if spec.seed is not None:
        msg.seed = spec.seed
    return msg


def source_kind_to_proto(kind: SourceKind) -> int:
    return _enum_out(_SOURCE, kind)


def module_stats(modules: Iterable[Any]) -> list[merge_pb2.ModuleStats]:
    """ModuleStats messages from objects with name, rank and relative_error."""
    return [merge_pb2.ModuleStats(name=m.name, rank=m.rank, relative_error=m.relative_error) for m in modules]


def resolved_adapter(source: Any, weight: float, config: Any | None) -> merge_pb2.ResolvedAdapter:
    """A ResolvedAdapter from a ResolvedSource, its weight and its parsed AdapterConfig (or None)."""
    msg = merge_pb2.ResolvedAdapter(
        id=source.id,
        source=source_kind_to_proto(source.kind),
        revision=source.revision,
        digest=source.digest,
        weight=weight,
    )
    if config is not None:
        msg.rank = config.r
        msg.alpha = float(config.lora_alpha)
        msg.use_rslora = bool(config.use_rslora)
        msg.base_model = config.base_model
        msg.target_modules.extend(config.target_modules)
    return msg
