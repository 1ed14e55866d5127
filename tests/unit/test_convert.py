"""Proto MergeSpec ⇄ domain MergeSpec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loramerge.errors import InvalidArgument, ResourceExhausted
from loramerge.v1 import merge_pb2 as P
from merge_service.convert import float32_to_decimal, spec_from_proto, spec_to_proto
from merge_service.spec import AdapterRef, Dtype, MergeSpec, SignMethod, SourceKind, Space, Strategy


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_defaults_for_unspecified_enums_and_unset_fields() -> None:
    spec = spec_from_proto(P.MergeSpec(adapters=[P.AdapterRef(id="org/a")]))
    assert spec == MergeSpec(adapters=(AdapterRef("org/a", SourceKind.AUTO, "", 1.0),))


def test_every_field_maps() -> None:
    msg = P.MergeSpec(
        adapters=[
            P.AdapterRef(id="a", source=P.LOCAL, weight=0.3),
            P.AdapterRef(id="org/b", source=P.HUB, revision="v1", weight=-1.5),
            P.AdapterRef(id="s3://bucket/c", source=P.S3),
        ],
        merge_strategy=P.DARE_TIES,
        density=0.7,
        majority_sign_method=P.FREQUENCY,
        seed=2**64 - 1,
        space=P.FACTORS,
        target_rank=16,
        dtype=P.BFLOAT16,
        max_rank=64,
    )
    spec = spec_from_proto(msg)
    assert spec.adapters == (
        AdapterRef("a", SourceKind.LOCAL, "", 0.3),
        AdapterRef("org/b", SourceKind.HUB, "v1", -1.5),
        AdapterRef("s3://bucket/c", SourceKind.S3, "", 1.0),
    )
    assert (spec.strategy, spec.density, spec.sign_method, spec.seed) == (
        Strategy.DARE_TIES,
        0.7,
        SignMethod.FREQUENCY,
        2**64 - 1,
    )
    assert (spec.space, spec.target_rank, spec.dtype, spec.max_rank) == (
        Space.FACTORS,
        16,
        Dtype.BFLOAT16,
        64,
    )
    assert spec_from_proto(spec_to_proto(spec)) == spec


def test_lorax_shorthand() -> None:
    spec = spec_from_proto(P.MergeSpec(ids=["a", "b"], weights=[0.25, 2.0]))
    assert spec.adapters == (AdapterRef("a", weight=0.25), AdapterRef("b", weight=2.0))
    assert spec_from_proto(P.MergeSpec(ids=["a", "b"])).adapters == (AdapterRef("a"), AdapterRef("b"))


@pytest.mark.parametrize(
    ("msg", "field", "words"),
    [
        (P.MergeSpec(ids=["a", "b"], weights=[1.0]), "spec.weights", "got 1 weights for 2 ids"),
        (P.MergeSpec(ids=["a"], weights=[1.0, 2.0]), "spec.weights", "got 2 weights for 1 ids"),
        (P.MergeSpec(ids=["a"], adapters=[P.AdapterRef(id="b")]), "spec.ids", "use one"),
        (P.MergeSpec(weights=[1.0], adapters=[P.AdapterRef(id="b")]), "spec.ids", "use one"),
        (P.MergeSpec(), "spec.adapters", "at least one"),
        (P.MergeSpec(adapters=[P.AdapterRef(id="a"), P.AdapterRef(id=" ")]), "spec.adapters[1].id", "' '"),
        (P.MergeSpec(ids=["a", ""]), "spec.ids[1]", "''"),
        (P.MergeSpec(adapters=[P.AdapterRef(id="a", weight=float("nan"))]), "spec.adapters[0].weight", "nan"),
        (P.MergeSpec(ids=["a"], weights=[float("inf")]), "spec.weights[0]", "inf"),
        (P.MergeSpec(ids=["a"], density=float("nan")), "spec.density", "nan"),
        (P.MergeSpec(ids=["a"], merge_strategy=99), "spec.merge_strategy", "unknown value 99"),
        (P.MergeSpec(ids=["a"], space=7), "spec.space", "DELTA, FACTORS"),
        (P.MergeSpec(ids=["a"], dtype=9), "spec.dtype", "9"),
        (P.MergeSpec(ids=["a"], majority_sign_method=5), "spec.majority_sign_method", "5"),
        (P.MergeSpec(adapters=[P.AdapterRef(id="a", source=8)]), "spec.adapters[0].source", "8"),
    ],
)
def test_structural_errors_name_field_and_value(msg: P.MergeSpec, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        spec_from_proto(msg)
    assert info.value.field == field
    assert field in info.value.message and words in info.value.message


def test_prefix_and_adapter_limit() -> None:
    with pytest.raises(InvalidArgument) as info:
        spec_from_proto(P.MergeSpec(ids=["a"], weights=[1.0, 1.0]), prefix="merged_adapters")
    assert info.value.field == "merged_adapters.weights"
    with pytest.raises(ResourceExhausted, match="3 adapters, more than the 2") as info2:
        spec_from_proto(P.MergeSpec(ids=["a", "b", "c"]), max_adapters=2)
    assert info2.value.field == "spec.adapters"


@given(st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_float32_decimal_round_trips(x: float) -> None:
    d = float32_to_decimal(x)
    assert f32(d) == f32(x)
    assert len(repr(d)) <= len(repr(f32(x)))


def test_float32_wire_values_become_their_decimal() -> None:
    msg = P.MergeSpec(ids=["a"], weights=[0.3], density=0.1)
    spec = spec_from_proto(msg)
    assert spec.adapters[0].weight == 0.3 and spec.density == 0.1


# --- pre-encoded data chunks (clients/loramerge/stream.py), checked against protobuf itself ---------------


@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=3000))
def test_encoded_data_chunk_is_what_protobuf_writes(offset: int, payload: bytes) -> None:
    from loramerge.stream import decode_data_chunk, encode_data_chunk

    raw = encode_data_chunk(offset, memoryview(payload))
    assert raw == P.MergeChunk(data=P.DataChunk(offset=offset, data=payload)).SerializeToString()
    parsed = P.MergeChunk.FromString(raw)
    assert (parsed.data.offset, parsed.data.data) == (offset, payload)
    decoded = decode_data_chunk(raw)
    assert decoded is not None and decoded[0] == offset and bytes(decoded[1]) == payload


def test_decode_leaves_other_messages_to_protobuf() -> None:
    from loramerge.stream import decode_data_chunk, serialize_chunk

    header = P.MergeChunk(header=P.MergeHeader(merge_key="k", total_bytes=3))
    assert decode_data_chunk(header.SerializeToString()) is None
    assert serialize_chunk(header) == header.SerializeToString()
    assert serialize_chunk(b"\x1a\x00") == b"\x1a\x00"
    assert decode_data_chunk(b"\x1a\x05\x08") is None  # truncated
    assert decode_data_chunk(b"\x1a\x80") is None
    assert decode_data_chunk(b"") is None
