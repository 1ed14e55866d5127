"""Property-based fuzzing of every MergeService RPC on the hardened stack (real process, mTLS, token).

Each answer is OK (and then self-consistent: a stream's bytes match its header's sha256) or a proper
status with a message; afterwards the service is healthy, logged no unexpected error, and its disk
cache holds exactly the entries of the merges that succeeded, with no temporary file left.
"""

from __future__ import annotations

import contextlib
import hashlib
import re

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramerge.v1 import merge_pb2
from tests.faults.stack import Stack
from tests.fuzz.messages import TEXT, check_error, merge_requests

pytestmark = pytest.mark.e2e

M = merge_pb2
KEY = re.compile(r"^[0-9a-f]{64}$")
ODD_KEYS = ["../x", "0" * 64, "*", ".json", "a" * 201, "a.json", "x.tmp-1"]
REQUEST_FIELDS = ("spec", "resume_offset", "expected_merge_key")
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def disk_keys(stack: Stack) -> set[str]:
    return {p.name.removesuffix(".json") for p in stack.cache_dir.glob("*.json")}


def cached_keys(stack: Stack, stub) -> set[str]:
    listed = stub.ListCached(M.ListCachedRequest(), metadata=stack.merge_metadata, timeout=30)
    return {e.merge_key for e in listed.entries}


def check_stream(chunks: list[M.MergeChunk], request: M.MergeRequest) -> str:
    """progress* header data* trailer, contiguous data from the requested offset, sha256 as announced."""
    kinds = [c.WhichOneof("item") for c in chunks]
    first_header = kinds.index("header")
    assert set(kinds[:first_header]) <= {"progress"}
    assert kinds[-1] == "trailer" and set(kinds[first_header + 1 : -1]) <= {"data"}
    header = chunks[first_header].header
    assert KEY.match(header.merge_key) and header.offset == request.resume_offset
    data = b"".join(c.data.data for c in chunks if c.WhichOneof("item") == "data")
    assert header.offset + len(data) == header.total_bytes == chunks[-1].trailer.total_bytes
    if header.offset == 0:
        assert hashlib.sha256(data).hexdigest() == header.sha256 == chunks[-1].trailer.sha256
    return header.merge_key


@pytest.fixture
def merge_fuzz(hardened_stack: Stack):
    """The stack and its stub; afterwards: healthy, no INTERNAL error, no temporary or stray file."""
    stack = hardened_stack
    stub = stack.merge_stub()
    internal = stack.merge.metric("loramerge_rpc_errors_total", {"code": "INTERNAL"})
    files = {p.name for p in stack.root.rglob("*") if "hub-cache" in p.parts or "s3-cache" in p.parts}
    yield stack, stub
    assert stack.serving()
    assert stack.merge.metric("loramerge_rpc_errors_total", {"code": "INTERNAL"}) == internal
    assert not list(stack.cache_dir.glob("*.tmp-*"))
    # Hub and S3 sources downloaded nothing for all those ids.
    assert {p.name for p in stack.root.rglob("*") if "hub-cache" in p.parts or "s3-cache" in p.parts} == files
    # Disk entries come in pairs and match what ListCached reports.
    names = [p.name for p in stack.cache_dir.iterdir()]
    assert sorted(n.removesuffix(".json") for n in names if n.endswith(".json")) == sorted(
        n.removesuffix(".safetensors") for n in names if n.endswith(".safetensors")
    )
    assert disk_keys(stack) <= cached_keys(stack, stub)


def test_fuzz_plan(merge_fuzz) -> None:
    stack, stub = merge_fuzz
    before = cached_keys(stack, stub)
    counts = {"ok": 0, "error": 0}

    @settings(FUZZ, max_examples=1500)
    @given(request=merge_requests())
    def plan(request: M.MergeRequest) -> None:
        try:
            reply = stub.Plan(request, metadata=stack.merge_metadata, timeout=30)
        except grpc.RpcError as e:
            check_error(e, REQUEST_FIELDS, [request])
            counts["error"] += 1
            return
        counts["ok"] += 1
        assert KEY.match(reply.merge_key) and reply.adapters and reply.base_model
        assert reply.rank >= 1 and reply.estimated_bytes > 0
        assert len(reply.adapters) == len(reply.effective_spec.adapters)

    plan()
    assert counts["ok"] > 0 and counts["error"] > 0
    assert cached_keys(stack, stub) == before  # Plan builds and caches nothing


def test_fuzz_merge_stream(merge_fuzz) -> None:
    stack, stub = merge_fuzz
    before = cached_keys(stack, stub)
    valid: set[str] = set()  # keys of the specs that were valid, whatever else the request got wrong

    @settings(FUZZ, max_examples=500)
    @given(request=merge_requests())
    def merge(request: M.MergeRequest) -> None:
        try:
            chunks = list(stub.Merge(request, metadata=stack.merge_metadata, timeout=60))
        except grpc.RpcError as e:
            check_error(e, REQUEST_FIELDS, [request])
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                # A valid spec with a bad resume offset may have been built (and cached) first.
                plan = M.MergeRequest(spec=request.spec)
                with contextlib.suppress(grpc.RpcError):
                    valid.add(stub.Plan(plan, metadata=stack.merge_metadata, timeout=30).merge_key)
            return
        valid.add(check_stream(chunks, request))

    merge()
    assert valid, "no valid merge was generated"
    # Only valid specs left a cache entry.
    assert cached_keys(stack, stub) - before <= valid
    assert disk_keys(stack) - before <= valid


def test_fuzz_list_cached_and_evict(merge_fuzz) -> None:
    stack, stub = merge_fuzz
    before = cached_keys(stack, stub)

    @settings(FUZZ, max_examples=400)
    @given(key=st.one_of(TEXT, st.sampled_from(ODD_KEYS)), all_=st.booleans())
    def evict(key: str, all_: bool) -> None:
        if all_ and not key:
            return  # a valid "evict everything": not what this test is about
        request = M.EvictRequest(merge_key=key, all=all_)
        try:
            reply = stub.Evict(request, metadata=stack.merge_admin_metadata, timeout=30)
        except grpc.RpcError as e:
            check_error(e, ("merge_key",), [request])
            return
        assert reply.evicted == 0  # none of these names a cached merge
        assert cached_keys(stack, stub) == before

    evict()
    assert cached_keys(stack, stub) == before


@pytest.mark.parametrize(
    ("weight", "dtype", "field"),
    [(3e38, M.FLOAT32, "spec.adapters[0].weight"), (1e6, M.FLOAT16, "spec.dtype")],
)
def test_a_merge_that_overflows_its_dtype_is_refused(
    hardened_stack: Stack, weight: float, dtype: int, field: str
) -> None:
    """Finite weights can still overflow the output dtype (float16 tops out at 65504): the answer must be
    INVALID_ARGUMENT naming the weight or dtype, never an adapter holding inf that vLLM would then
    serve, and nothing is cached."""
    stack = hardened_stack
    stub = stack.merge_stub()
    before = cached_keys(stack, stub), disk_keys(stack)
    spec = M.MergeSpec(adapters=[M.AdapterRef(id="b", weight=weight)], dtype=dtype)
    request = M.MergeRequest(spec=spec)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Merge(request, metadata=stack.merge_metadata, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field)
    check_error(info.value, (field,), [request])
    assert (cached_keys(stack, stub), disk_keys(stack)) == before
