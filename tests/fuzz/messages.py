"""Hypothesis strategies for random and adversarial loramerge requests, and what a proper answer is.

Values mix the ordinary (the stack's adapters "a", "b", "c", "e", weights such as 0.5) with the
hostile: NaN and infinities, subnormals, float32 extremes, unknown enum numbers, uint64 and uint32
extremes, path escapes, NUL bytes, bidirectional control characters, S3 and Hub ids (the stack keeps
both offline), and very long strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import grpc
from google.protobuf.message import Message
from grpc_status import rpc_status
from hypothesis import strategies as st

from loramerge.errors import violations_from_status
from loramerge.v1 import inference_pb2, merge_pb2

M = merge_pb2
I = inference_pb2  # noqa: E741

# Codes a request can deserve; anything else (INTERNAL, UNKNOWN, DATA_LOSS, ...) is a defect.
PROPER_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,  # the Hub and S3 are offline for the stack
    }
)
MAX_MESSAGE_CHARS = 2000
ESCAPE_FACTOR = 10  # repr() of one character is at most 10 ("\\U0004f7d6")

LOCAL_IDS = ["a", "b", "c", "e"]
HOSTILE_IDS = [
    "d",  # another base model
    "big",  # over max_adapter_bytes
    "missing",
    "",
    ".",
    "..",
    "../a",
    "a/../../etc",
    "/etc/passwd",
    "~root/x",
    "a\x00b",
    "a/",
    "./a",
    "\u202ea",
    "é",
    "org/name",
    "org/name/extra",
    "-org/name",
    "hf://org/name",
    "s3://",
    "s3://Bad_Bucket/x",
    "s3:///prefix",
    "C:\\adapters\\a",
    "a" * 300,
    "%2e%2e/a",
]

FLOATS = st.one_of(
    st.sampled_from(
        [0.0, -0.0, 0.5, 1.0, 0.25, -1.0, 2.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, -3.4e38, 1e-7]
    ),
    st.floats(width=32),
)
UNIT_FLOATS = st.one_of(st.sampled_from([0.5, 0.7, 1.0]), FLOATS)
UINT32 = st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 17, 64, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
ENUMS = st.one_of(st.integers(0, 5), st.sampled_from([-1, 6, 99, 2**31 - 1, -(2**31)]))
TEXT = st.one_of(
    st.text(max_size=24), st.sampled_from(["", " ", "\x00", "../../x", "x" * 5000, "\ud7ff\ue000"])
)
PLAIN_WEIGHTS = st.sampled_from([0.5, 1.0, 0.3, -0.5])
PROMPTS = st.one_of(st.sampled_from(["The quick brown fox", "", "\x00", "x" * 600]), st.text(max_size=30))
IDS = st.one_of(st.sampled_from(LOCAL_IDS), st.sampled_from(HOSTILE_IDS), st.text(max_size=40))


@st.composite
def adapter_refs(draw: st.DrawFn) -> M.AdapterRef:
    ref = M.AdapterRef(id=draw(IDS), source=draw(ENUMS), revision=draw(st.one_of(st.just(""), TEXT)))
    if draw(st.booleans()):
        ref.weight = draw(UNIT_FLOATS)
    return ref


@st.composite
def merge_specs(draw: st.DrawFn) -> M.MergeSpec:
    spec = M.MergeSpec(
        adapters=draw(st.lists(adapter_refs(), max_size=6)),
        merge_strategy=draw(ENUMS),
        majority_sign_method=draw(ENUMS),
        space=draw(ENUMS),
        target_rank=draw(UINT32),
        dtype=draw(ENUMS),
        max_rank=draw(UINT32),
    )
    if draw(st.booleans()):
        spec.density = draw(UNIT_FLOATS)
    if draw(st.booleans()):
        spec.seed = draw(UINT64)
    if draw(st.integers(0, 3)) == 0:  # the LoRAX shorthand, with or without adapters beside it
        spec.ids.extend(draw(st.lists(IDS, max_size=5)))
        spec.weights.extend(draw(st.lists(UNIT_FLOATS, max_size=5)))
    return spec


@st.composite
def plausible_specs(draw: st.DrawFn) -> M.MergeSpec:
    """A valid-looking merge of the stack's adapters, then, half the time, one field made hostile: the
    fuzzer spends its time near the boundary instead of far outside it."""
    spec = M.MergeSpec(
        adapters=[
            M.AdapterRef(
                id=draw(st.sampled_from(LOCAL_IDS)), weight=draw(st.sampled_from([0.5, 1.0, 0.3, -0.5]))
            )
            for _ in range(draw(st.integers(1, 3)))
        ],
        merge_strategy=draw(st.integers(1, 5)),
        majority_sign_method=draw(st.integers(0, 2)),
        space=draw(st.integers(0, 2)),
        target_rank=draw(st.sampled_from([0, 0, 4, 8])),
        dtype=draw(st.integers(0, 3)),
    )
    if spec.merge_strategy != M.LINEAR:
        spec.density = draw(st.sampled_from([0.5, 0.9, 1.0]))
    if draw(st.booleans()):
        spec.seed = draw(st.integers(0, 3))
    if draw(st.booleans()):
        hostile = draw(
            st.sampled_from(
                ["weight", "density", "strategy", "space", "dtype", "target_rank", "max_rank", "id", "source"]
            )
        )
        ref = spec.adapters[draw(st.integers(0, len(spec.adapters) - 1))]
        if hostile == "weight":
            ref.weight = draw(FLOATS)
        elif hostile == "density":
            spec.density = draw(FLOATS)
        elif hostile == "strategy":
            spec.merge_strategy = draw(ENUMS)
        elif hostile == "space":
            spec.space = draw(ENUMS)
        elif hostile == "dtype":
            spec.dtype = draw(ENUMS)
        elif hostile == "target_rank":
            spec.target_rank = draw(UINT32)
        elif hostile == "max_rank":
            spec.max_rank = draw(UINT32)
        elif hostile == "id":
            ref.id = draw(st.one_of(st.sampled_from(HOSTILE_IDS), st.text(max_size=40)))
        else:
            ref.source = draw(ENUMS)
    return spec


SPECS = st.one_of(merge_specs(), plausible_specs())


@st.composite
def merge_requests(draw: st.DrawFn) -> M.MergeRequest:
    request = M.MergeRequest(spec=draw(SPECS))
    if draw(st.integers(0, 3)) == 0:
        request.resume_offset = draw(UINT64)
    if draw(st.integers(0, 3)) == 0:
        request.expected_merge_key = draw(st.one_of(TEXT, st.just("0" * 64)))
    return request


@st.composite
def sampling_params(draw: st.DrawFn) -> I.SamplingParams:
    """Anything the message can hold."""
    s = I.SamplingParams(
        # Valid lengths stay short (the engine is shared); the invalid ones are past max_model_len 512.
        max_tokens=draw(st.one_of(st.integers(0, 12), st.sampled_from([513, 2**31, 2**32 - 1]))),
        temperature=draw(FLOATS),
        top_p=draw(FLOATS),
        top_k=draw(st.one_of(st.integers(0, 50), UINT32)),
        stop=draw(st.lists(st.one_of(st.text(max_size=4), st.just("")), max_size=18)),
        repetition_penalty=draw(FLOATS),
        presence_penalty=draw(FLOATS),
        frequency_penalty=draw(FLOATS),
        min_tokens=draw(st.one_of(st.integers(0, 12), UINT32)),
        ignore_eos=draw(st.booleans()),
    )
    if draw(st.booleans()):
        s.seed = draw(UINT64)
    return s


@st.composite
def plausible_sampling(draw: st.DrawFn) -> I.SamplingParams:
    """Valid values, then, a third of the time, one field from ``sampling_params``."""
    s = I.SamplingParams(
        max_tokens=draw(st.integers(0, 12)),
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0])),
        top_p=draw(st.sampled_from([0.0, 0.9, 1.0])),
        top_k=draw(st.sampled_from([0, 1, 40])),
        stop=draw(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        min_tokens=draw(st.integers(0, 2)),
    )
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 2)) == 0:
        hostile = draw(sampling_params())
        name = draw(st.sampled_from([f.name for f in I.SamplingParams.DESCRIPTOR.fields]))
        s.ClearField(name)
        if name == "stop":
            s.stop.extend(hostile.stop)
        elif name != "seed" or hostile.HasField("seed"):
            setattr(s, name, getattr(hostile, name))
    return s


@st.composite
def generate_requests(draw: st.DrawFn) -> I.GenerateRequest:
    request = I.GenerateRequest(prompt=draw(PROMPTS), request_id=draw(st.one_of(st.just(""), TEXT)))
    sampling = draw(st.one_of(st.none(), plausible_sampling(), sampling_params()))
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    choice = draw(st.sampled_from(["base", "adapter", "merged", "merged", "merge_key", "mixed"]))
    if choice == "adapter" or (choice == "mixed" and draw(st.booleans())):
        request.adapter_id = draw(IDS)
        if draw(st.integers(0, 2)) == 0:
            request.adapter_weight = draw(UNIT_FLOATS)
    if choice == "mixed" or (choice == "adapter" and draw(st.integers(0, 3)) == 0):
        if draw(st.booleans()):
            request.adapter_source = draw(ENUMS)
        if draw(st.booleans()):
            request.adapter_revision = draw(TEXT)
        if draw(st.booleans()):
            request.adapter_weight = draw(UNIT_FLOATS)
    if choice == "merged" or (choice == "mixed" and draw(st.booleans())):
        request.merged_adapters.CopyFrom(draw(SPECS))
    if choice == "merge_key" or (choice == "mixed" and draw(st.booleans())):
        request.merge_key = draw(st.one_of(TEXT, st.just("0" * 64)))
    return request


def check_error(
    err: grpc.RpcError, allowed_fields: tuple[str, ...] = (), sent: Iterable[Message] = ()
) -> None:
    """A proper refusal: an expected code, a message, and (for INVALID_ARGUMENT) a BadRequest naming a
    field of the request. Messages may quote the bad value, but not amplify the request: their length
    is bounded by a constant plus the escaped size of the request's non-data fields (``sent``)."""
    code = err.code()
    assert code in PROPER_CODES, f"{code.name}: {err.details()}"
    details = err.details() or ""
    assert details.strip(), f"{code.name} without a message"
    echo = sum(
        len(m.SerializeToString()) for m in sent if not (isinstance(m, M.MergeChunk) and m.HasField("data"))
    )
    bound = MAX_MESSAGE_CHARS + ESCAPE_FACTOR * echo
    assert len(details) <= bound, f"{len(details)}-character message: {details[:200]}..."
    if code == grpc.StatusCode.INVALID_ARGUMENT and allowed_fields:
        violations = violations_from_status(rpc_status.from_call(err))
        assert violations, f"INVALID_ARGUMENT without field violations: {details}"
        assert all(v.field.startswith(allowed_fields) for v in violations), [v.field for v in violations]
