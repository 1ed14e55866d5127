"""Typed request objects that turn into the protobuf messages.

``MergedAdapters`` reads like LoRAX's (ids, weights, merge_strategy, density,
majority_sign_method) and adds this project's space, seed, target_rank, dtype and max_rank.
Enum-valued fields take strings in any case ("ties", "TIES", "dare-ties") or the proto's ints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from loramerge.errors import InvalidArgument
from loramerge.v1 import inference_pb2, merge_pb2

EnumLike = str | int


def enum_value(
    enum: EnumTypeWrapper, value: EnumLike | None, field_name: str, aliases: dict[str, str]
) -> int:
    """The proto enum number for ``value``; None and "" give 0 (the server's default)."""
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        if value not in enum.values():
            msg = f"{field_name} must be one of {_choices(enum)}, got {value}"
            raise InvalidArgument(msg, field=field_name)
        return value
    key = str(value).strip().lower().replace("-", "_")
    name = aliases.get(key, key).upper()
    if name not in enum.DESCRIPTOR.values_by_name or name.endswith("_UNSPECIFIED"):
        raise InvalidArgument(
            f"{field_name} must be one of {_choices(enum)}, got {value!r}", field=field_name
        )
    return enum.Value(name)


def enum_choices(enum: EnumTypeWrapper) -> tuple[str, ...]:
    """Lower-case value names of a proto enum, without its UNSPECIFIED value (e.g. MergeStrategy)."""
    return tuple(v.name.lower() for v in enum.DESCRIPTOR.values if not v.name.endswith("_UNSPECIFIED"))


def _choices(enum: EnumTypeWrapper) -> str:
    names = enum.DESCRIPTOR.values_by_name
    extra = "auto, " if enum is merge_pb2.AdapterSource else ""
    return extra + ", ".join(k.lower() for k in names if not k.endswith("_UNSPECIFIED"))


def strategy_value(value: EnumLike | None, field_name: str = "merge_strategy") -> int:
    return enum_value(merge_pb2.MergeStrategy, value, field_name, {})


def sign_method_value(value: EnumLike | None, field_name: str = "majority_sign_method") -> int:
    return enum_value(merge_pb2.MajoritySignMethod, value, field_name, {})


def space_value(value: EnumLike | None, field_name: str = "space") -> int:
    return enum_value(merge_pb2.MergeSpace, value, field_name, {})


def dtype_value(value: EnumLike | None, field_name: str = "dtype") -> int:
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    return enum_value(merge_pb2.Dtype, value, field_name, aliases)


def source_value(value: EnumLike | None, field_name: str = "source") -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return merge_pb2.ADAPTER_SOURCE_UNSPECIFIED  # the server picks by the id's shape
    return enum_value(merge_pb2.AdapterSource, value, field_name, {})


def enum_name(enum: EnumTypeWrapper, number: int, default: str) -> str:
    """Lower-case name of an enum number, with ``default`` for the UNSPECIFIED value."""
    name = enum.Name(number)
    return default if name.endswith("_UNSPECIFIED") else name.lower()


@dataclass(frozen=True)
class Adapter:
    """One adapter: an id (hub repo, path under the service's adapter root, or s3://...)."""

    id: str
    weight: float | None = None
    source: EnumLike = "auto"
    revision: str = ""

    def to_proto(self) -> merge_pb2.AdapterRef:
        ref = merge_pb2.AdapterRef(id=self.id, source=source_value(self.source), revision=self.revision)
        if self.weight is not None:
            ref.weight = float(self.weight)
        return ref

    @classmethod
    def parse(cls, text: str, source: EnumLike = "auto", revision: str = "") -> Adapter:
        """``ID`` or ``ID:WEIGHT``; the weight is taken only when what follows the last ':' is a number
        (so ``s3://bucket/x`` stays an id)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(head, float(tail), source, revision)
            except ValueError:
                pass
        if not text:
            raise InvalidArgument("adapter id must not be empty, got ''", field="adapter")
        return cls(text, None, source, revision)


@dataclass(frozen=True)
class MergedAdapters:
    """A set of adapters merged into one, LoRAX style.

    Give either ``ids`` (with optional parallel ``weights``) or ``adapters``. Defaults match the
    server's: linear, total sign, delta space, exact rank, float32. ``density`` is required by
    ties, dare_linear, dare_ties and magnitude_prune and must be in (0, 1].
    """

    ids: Sequence[str] = ()
    weights: Sequence[float] | None = None
    merge_strategy: EnumLike = "linear"
    density: float | None = None
    majority_sign_method: EnumLike = "total"
    space: EnumLike = "delta"
    seed: int | None = None
    target_rank: int = 0
    dtype: EnumLike = "float32"
    max_rank: int = 0
    adapters: Sequence[Adapter] = field(default_factory=tuple)

    def to_proto(self) -> merge_pb2.MergeSpec:
        spec = merge_pb2.MergeSpec(
            adapters=[a.to_proto() for a in self.adapters],
            ids=list(self.ids),
            weights=[float(w) for w in (self.weights or ())],
            merge_strategy=strategy_value(self.merge_strategy, "merge_strategy"),
            majority_sign_method=sign_method_value(self.majority_sign_method, "majority_sign_method"),
            space=space_value(self.space, "space"),
            target_rank=int(self.target_rank),
            dtype=dtype_value(self.dtype, "dtype"),
            max_rank=int(self.max_rank),
        )
        if self.density is not None:
            spec.density = float(self.density)
        if self.seed is not None:
            spec.seed = int(self.seed)
        return spec


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for Generate; zeros mean the server's defaults (16 tokens, greedy, no cuts)."""

    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False

    def to_proto(self) -> inference_pb2.SamplingParams:
        msg = inference_pb2.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=list(self.stop),
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            msg.seed = self.seed
        return msg


SpecLike = MergedAdapters | merge_pb2.MergeSpec | dict[str, Any] | str
AdapterChoice = Adapter | MergedAdapters | merge_pb2.MergeSpec | str | None


def to_merge_spec(spec: SpecLike) -> merge_pb2.MergeSpec:
    """A MergeSpec from a typed object, a proto, or the proto's JSON (a dict or a JSON string)."""
    if isinstance(spec, merge_pb2.MergeSpec):
        return spec
    if isinstance(spec, MergedAdapters):
        return spec.to_proto()
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"spec must be JSON, got {spec[:80]!r}: {err}", field="spec") from None
    if isinstance(spec, dict):
        try:
            return json_format.ParseDict(spec, merge_pb2.MergeSpec())
        except json_format.ParseError as err:
            raise InvalidArgument(f"spec is not a MergeSpec: {err}", field="spec") from None
    raise InvalidArgument(f"spec must be a MergedAdapters, MergeSpec or dict, got {type(spec).__name__}")


def generate_request(
    prompt: str,
    adapter: AdapterChoice = None,
    sampling: SamplingParams | inference_pb2.SamplingParams | None = None,
    *,
    merge_key: str = "",
    request_id: str = "",
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest for the base model (no adapter), one adapter (an ``Adapter`` or its id),
    a merged set (``MergedAdapters`` / ``MergeSpec``), or an already-loaded ``merge_key``."""
    if isinstance(sampling, SamplingParams):
        sampling = sampling.to_proto()
    req = inference_pb2.GenerateRequest(
        prompt=prompt, sampling=sampling, merge_key=merge_key, request_id=request_id
    )
    if isinstance(adapter, str):
        adapter = Adapter(adapter)
    if isinstance(adapter, Adapter):
        req.adapter_id = adapter.id
        req.adapter_source = source_value(adapter.source, "adapter_source")
        req.adapter_revision = adapter.revision
        if adapter.weight is not None:
            req.adapter_weight = float(adapter.weight)
    elif adapter is not None:
        req.merged_adapters.CopyFrom(to_merge_spec(adapter))
    return req


def to_json(message: Any) -> dict[str, Any]:
    """A proto message as a dict with proto field names (the JSON grpcurl prints)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
