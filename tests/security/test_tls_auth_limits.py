"""Request limits on the hardened stack: each one answers RESOURCE_EXHAUSTED with a message naming
the field and the numbers, and leaves nothing behind (no cache entry, no adapter folder).

Limits (tests/faults/stack.py ``default_limits``): at most 4 adapters per merge; the largest ordinary
test adapter is the most bytes one adapter may have ("big", rank 16, has more); three rank-8 adapters
fit in one request's byte budget and four adapters do not; 64 KiB requests to the merge service,
1 MiB to the inference service; 1 MiB pushed adapters.
"""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from grpc_status import rpc_status

from loramerge.errors import violations_from_status
from loramerge.v1 import inference_pb2, merge_pb2
from tests.faults.stack import Stack

pytestmark = pytest.mark.e2e

I = inference_pb2  # noqa: E741
M = merge_pb2


def refs(*ids: str) -> M.MergeSpec:
    return M.MergeSpec(adapters=[M.AdapterRef(id=i, weight=0.5) for i in ids])


def exhausted(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    return info.value


def fields(err: grpc.RpcError) -> list[str]:
    return [v.field for v in violations_from_status(rpc_status.from_call(err))]


def snapshot(stack: Stack) -> tuple[set[str], set[str], list[str]]:
    listed = stack.merge_stub().ListCached(M.ListCachedRequest(), metadata=stack.merge_metadata, timeout=30)
    return (
        {p.name for p in stack.cache_dir.iterdir()},
        stack.adapter_folders(),
        sorted(e.merge_key for e in listed.entries),
    )


@pytest.fixture
def unchanged(hardened_stack: Stack):
    before = snapshot(hardened_stack)
    yield hardened_stack
    assert snapshot(hardened_stack) == before
    assert hardened_stack.serving()


def test_merge_service_limits(unchanged: Stack) -> None:
    stack = unchanged
    stub, md = stack.merge_stub(), stack.merge_metadata
    for rpc in (stub.Plan, stub.Merge):
        err = exhausted(rpc, M.MergeRequest(spec=refs("a", "b", "c", "e", "a")), metadata=md, timeout=60)
        assert "5 adapters" in err.details() and "4 allowed" in err.details()
        assert fields(err) == ["spec.adapters"]

        err = exhausted(rpc, M.MergeRequest(spec=refs("a", "big")), metadata=md, timeout=60)
        assert "'big'" in err.details() and str(stack.limits.max_adapter_bytes) in err.details()
        assert fields(err) == ["spec.adapters[1]"]

        err = exhausted(rpc, M.MergeRequest(spec=refs("a", "c", "e", "b")), metadata=md, timeout=60)
        assert str(stack.limits.max_request_bytes) in err.details()

    # A message above the merge service's receive limit is refused by gRPC before any handler runs.
    huge = M.MergeRequest(spec=M.MergeSpec(ids=["x" * stack.limits.merge_max_message_bytes]))
    exhausted(stub.Plan, huge, metadata=md, timeout=60)
    # Within every limit, the same service answers.
    assert stub.Plan(M.MergeRequest(spec=refs("a", "c", "e")), metadata=md, timeout=60).merge_key


def test_inference_service_limits(unchanged: Stack) -> None:
    stack = unchanged
    stub, md = stack.inference_stub(), stack.inference_metadata
    err = exhausted(
        stub.Generate,
        I.GenerateRequest(prompt="hi", merged_adapters=refs("a", "b", "c", "e", "a")),
        metadata=md,
        timeout=60,
    )
    assert fields(err) == ["merged_adapters.adapters"] and "5 adapters" in err.details()
    err = exhausted(stub.Generate, I.GenerateRequest(prompt="hi", adapter_id="big"), metadata=md, timeout=60)
    assert "'big'" in err.details() and fields(err) == ["adapter_id"]
    err = exhausted(
        stub.GenerateStream,
        I.GenerateRequest(prompt="x" * (stack.limits.inference_max_message_bytes + 1)),
        metadata=md,
        timeout=60,
    )

    # A pushed adapter larger than the inference service's bound is refused on its header.
    too_big = stack.limits.inference_max_adapter_bytes + 1
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    header = M.MergeHeader(
        merge_key="f" * 64,
        adapter_config_json=json.dumps({**config, "base_model_name_or_path": str(stack.model)}),
        total_bytes=too_big,
        sha256=hashlib.sha256(b"").hexdigest(),
        rank=8,
        base_model=str(stack.model),
    )
    chunks = [M.MergeChunk(header=header), M.MergeChunk(data=M.DataChunk(offset=0, data=b"\0" * 1024))]
    err = exhausted(stub.LoadAdapter, iter(chunks), metadata=stack.inference_admin_metadata, timeout=60)
    assert str(too_big) in err.details() and fields(err) == ["header.total_bytes"]
