"""Pure parts of the client: typed requests to protos, backoff arithmetic, stream reassembly."""

from __future__ import annotations

import hashlib
import random

import grpc
import pytest

from loramerge import errors as E
from loramerge.stream import stream_chunks
from loramerge.v1 import inference_pb2, merge_pb2
from loramerge_client import Adapter, DataLoss, MergedAdapters, MergeReceiver, RetryPolicy, SamplingParams
from loramerge_client.errors import exit_code_for, make_error
from loramerge_client.retry import Deadline, Retrier
from loramerge_client.types import generate_request, to_merge_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [("ties", merge_pb2.TIES), ("TIES", merge_pb2.TIES), ("dare-linear", merge_pb2.DARE_LINEAR), (4, 4)],
)
def test_strategy_strings_any_case(text, expected) -> None:
    assert MergedAdapters(ids=["a"], merge_strategy=text).to_proto().merge_strategy == expected


def test_merged_adapters_to_proto() -> None:
    spec = MergedAdapters(
        ids=["a", "b"],
        weights=[0.7, 0.3],
        merge_strategy="ties",
        density=0.5,
        majority_sign_method="FREQUENCY",
        space="factors",
        seed=0,
        target_rank=8,
        dtype="bf16",
    ).to_proto()
    assert list(spec.ids) == ["a", "b"] and list(spec.weights) == pytest.approx([0.7, 0.3])
    assert spec.majority_sign_method == merge_pb2.FREQUENCY and spec.space == merge_pb2.FACTORS
    assert spec.HasField("seed") and spec.seed == 0  # seed 0 is a real seed, not "unset"
    assert spec.dtype == merge_pb2.BFLOAT16 and spec.target_rank == 8
    bare = MergedAdapters(ids=["a"]).to_proto()
    assert not bare.HasField("density") and not bare.HasField("seed")
    assert bare.merge_strategy == merge_pb2.LINEAR

    refs = MergedAdapters(
        adapters=[Adapter("a", 0.5, "local"), Adapter("org/b", None, "hub", "main")]
    ).to_proto()
    assert refs.adapters[0].source == merge_pb2.LOCAL and refs.adapters[0].weight == 0.5
    assert not refs.adapters[1].HasField("weight") and refs.adapters[1].revision == "main"


def test_bad_enum_names_the_field_and_value() -> None:
    with pytest.raises(E.InvalidArgument) as info:
        MergedAdapters(ids=["a"], merge_strategy="avg").to_proto()
    assert info.value.field == "merge_strategy" and "'avg'" in str(info.value) and "ties" in str(info.value)
    with pytest.raises(E.InvalidArgument, match="source"):
        Adapter("a", source="ftp").to_proto()


@pytest.mark.parametrize(
    ("text", "adapter"),
    [
        ("a", Adapter("a")),
        ("a:0.5", Adapter("a", 0.5)),
        ("org/name:-1", Adapter("org/name", -1.0)),
        ("s3://bucket/x", Adapter("s3://bucket/x")),
        ("s3://bucket/x:2", Adapter("s3://bucket/x", 2.0)),
    ],
)
def test_adapter_parse(text: str, adapter: Adapter) -> None:
    assert Adapter.parse(text) == adapter


def test_spec_from_json_and_generate_request() -> None:
    spec = to_merge_spec('{"ids": ["a", "b"], "merge_strategy": "TIES", "density": 0.4}')
    assert spec.merge_strategy == merge_pb2.TIES and spec.density == pytest.approx(0.4)
    with pytest.raises(E.InvalidArgument, match="spec"):
        to_merge_spec('{"ids": "nope", "bogus": 1}')
    with pytest.raises(E.InvalidArgument, match="JSON"):
        to_merge_spec("{not json")

    req = generate_request("p", Adapter("x", 0.5, "hub", "v1"), SamplingParams(max_tokens=3, stop=["."]))
    assert req.adapter_id == "x" and req.adapter_weight == 0.5 and req.adapter_source == merge_pb2.HUB
    assert req.adapter_revision == "v1" and list(req.sampling.stop) == ["."]
    assert not req.sampling.HasField("seed")
    assert not generate_request("p").HasField("merged_adapters")
    assert generate_request("p", {"ids": ["a"]}).merged_adapters.ids == ["a"]
    assert isinstance(
        generate_request("p", sampling=inference_pb2.SamplingParams()), inference_pb2.GenerateRequest
    )


def test_backoff_grows_and_caps() -> None:
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2, max_backoff=0.5, jitter=0)
    assert [policy.backoff(k) for k in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = RetryPolicy(initial_backoff=1.0, jitter=0.2)
    rng = random.Random(0)
    assert all(0.8 <= jittered.backoff(1, rng) <= 1.2 for _ in range(100))


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"{self._code.name} from test"

    def trailing_metadata(self):
        return ()


def test_retrier_sleeps_on_unavailable_only_and_respects_deadline() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    policy = RetryPolicy(max_attempts=10, initial_backoff=1.0, multiplier=2, max_backoff=8, jitter=0)
    retrier = Retrier(policy, Deadline(5.0, clock=lambda: now[0]), sleep=sleep)
    assert retrier.timeout() == 5.0
    retrier.after_failure(_Err(grpc.StatusCode.UNAVAILABLE))  # waits 1s
    assert retrier.timeout() == 4.0
    retrier.after_failure(_Err(grpc.StatusCode.UNAVAILABLE))  # waits 2s
    assert retrier.timeout() == 2.0
    with pytest.raises(E.Unavailable):  # the next wait (4s) would pass the deadline
        retrier.after_failure(_Err(grpc.StatusCode.UNAVAILABLE))
    assert slept == [1.0, 2.0]

    fresh = Retrier(policy, Deadline(None), sleep=sleep)
    fresh.timeout()
    with pytest.raises(E.Internal):
        fresh.after_failure(_Err(grpc.StatusCode.INTERNAL))
    with pytest.raises(E.LoramergeError) as info:
        fresh.after_failure(_Err(grpc.StatusCode.UNIMPLEMENTED))
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED  # a code without a class keeps its code
    # Retried: a build that saw its inputs change (ABORTED) and a call grpc dropped while its server
    # was stopping (CANCELLED, which a blocking call of ours never causes itself).
    for code in (grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED):
        again = Retrier(policy, Deadline(None), sleep=sleep)
        again.timeout()
        again.after_failure(_Err(code))


def test_exit_codes() -> None:
    assert exit_code_for(E.InvalidArgument("x")) == 2
    assert exit_code_for(E.NotFound("x")) == 2
    assert exit_code_for(E.FailedPrecondition("x")) == 2
    assert exit_code_for(E.Unavailable("x")) == 3
    assert exit_code_for(E.DeadlineExceeded("x")) == 3
    assert exit_code_for(E.Internal("x")) == 1
    assert exit_code_for(make_error(grpc.StatusCode.DATA_LOSS, "x")) == 1
    assert exit_code_for(RuntimeError("x")) == 1


def _header(data: bytes, offset: int = 0) -> merge_pb2.MergeHeader:
    return merge_pb2.MergeHeader(
        merge_key="k", total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), offset=offset
    )


def test_receiver_reassembles_and_resumes() -> None:
    data = bytes(range(200)) * 50
    chunks = list(stream_chunks(_header(data), data, chunk_bytes=1000))
    rx = MergeReceiver()
    rx.request(merge_pb2.MergeSpec())
    rx.feed_all(chunks[:4])  # header + 3 data chunks, then the connection drops
    assert rx.received == 3000
    req = rx.request(merge_pb2.MergeSpec())
    assert req.resume_offset == 3000 and req.expected_merge_key == "k"
    rx.feed(merge_pb2.MergeChunk(header=_header(data, offset=3000)))
    rx.feed_all(chunks[4:])
    result = rx.result()
    assert result.data == data and result.resumed == 1


@pytest.mark.parametrize("defect", ["gap", "short", "bad_sha", "other_merge", "no_header"])
def test_receiver_rejects_broken_streams(defect: str) -> None:
    data = bytes(range(100)) * 30
    chunks = list(stream_chunks(_header(data), data, chunk_bytes=1000))
    rx = MergeReceiver()
    rx.request(merge_pb2.MergeSpec())
    with pytest.raises(DataLoss):
        if defect == "gap":
            rx.feed_all([chunks[0], chunks[2]])
        elif defect == "short":
            rx.feed_all([*chunks[:2], chunks[-1]])
        elif defect == "bad_sha":
            bad = merge_pb2.MergeHeader()
            bad.CopyFrom(chunks[0].header)
            bad.sha256 = "0" * 64
            rx.feed_all([merge_pb2.MergeChunk(header=bad), *chunks[1:]])
        elif defect == "other_merge":
            rx.feed_all(chunks[:2])
            rx.request(merge_pb2.MergeSpec())
            other = _header(data, offset=1000)
            other.merge_key = "other"
            rx.feed(merge_pb2.MergeChunk(header=other))
        else:
            rx.feed_all(chunks[1:])
        rx.result()
