"""Faults across the inference -> merge hop, on real processes (the ``hardened_stack`` fixture).

The merge service streams through a TCP proxy the test slows down, so that a SIGKILL lands while a
stream is in flight. Oracles: the merge service's own bytes (sha256) and a clean fetch of the same
spec (same tokens); the adapter folders on disk against ListAdapters (nothing partial is kept).
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest

from loramerge.v1 import inference_pb2, merge_pb2
from tests.faults.stack import Stack

pytestmark = pytest.mark.e2e

I = inference_pb2  # noqa: E741
M = merge_pb2
SLOW = 24 * 1024  # bytes per second through the proxy while a fault is staged
PROMPT = "Once upon a time, there was"


def spec(*pairs: tuple[str, float]) -> M.MergeSpec:
    return M.MergeSpec(adapters=[M.AdapterRef(id=i, weight=w) for i, w in pairs])


def generate(stack: Stack, s: M.MergeSpec | None = None, timeout: float = 120) -> I.GenerateResponse:
    request = I.GenerateRequest(prompt=PROMPT, sampling=I.SamplingParams(max_tokens=12, temperature=0))
    if s is not None:
        request.merged_adapters.CopyFrom(s)
    return stack.inference_stub().Generate(request, metadata=stack.inference_metadata, timeout=timeout)


def loaded(stack: Stack) -> dict[str, str]:
    """merge key -> vLLM name of every adapter the inference service lists."""
    reply = stack.inference_stub().ListAdapters(
        I.ListAdaptersRequest(), metadata=stack.inference_metadata, timeout=30
    )
    return {a.merge_key: a.name for a in reply.adapters}


def assert_folders_match_listing(stack: Stack) -> None:
    """Every adapter folder on disk belongs to a listed adapter and vice versa: nothing partial."""
    listed = loaded(stack)
    folders = stack.adapter_folders()
    assert len(folders) == len(listed), (folders, listed)
    for name in listed.values():
        lora_int_id = int(name.rsplit("-", 1)[1])
        assert any(int(f.split("-")[0]) == lora_int_id for f in folders), (name, folders)


def merged_bytes(stack: Stack, s: M.MergeSpec) -> tuple[str, bytes]:
    """(merge key, safetensors bytes) straight from the merge service, as the inference service asks."""
    from inference_service.request_specs import normalize_spec
    from tests.faults.stack import MAX_LORA_RANK

    header, data = None, bytearray()
    request = M.MergeRequest(spec=normalize_spec(s, MAX_LORA_RANK))
    for chunk in stack.merge_stub().Merge(request, metadata=stack.merge_metadata, timeout=120):
        if chunk.HasField("header"):
            header = chunk.header
        elif chunk.HasField("data"):
            data += chunk.data.data
    assert header is not None and hashlib.sha256(data).hexdigest() == header.sha256
    return header.merge_key, bytes(data)


def stream_in_flight(stack: Stack, call: Future, at_least: int) -> None:
    """Wait until ``at_least`` bytes went downstream through the proxy since the call began."""
    start = stack.proxy.downstream_bytes
    deadline = time.monotonic() + 90
    while stack.proxy.downstream_bytes - start < at_least:
        assert not call.done(), f"the call ended before the fault: {call.exception()!r}"
        assert time.monotonic() < deadline, "the merge stream never got going"
        time.sleep(0.05)


def test_merge_service_killed_mid_stream_and_not_back_fails_cleanly(hardened_stack: Stack) -> None:
    stack = hardened_stack
    before_loaded, before_folders = loaded(stack), stack.adapter_folders()
    target = spec(("a", 0.35), ("c", 0.65))
    stack.proxy.throttle(SLOW)
    try:
        with ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            call = pool.submit(generate, stack, target, 12)
            stream_in_flight(stack, call, 48 * 1024)
            stack.kill_merge()
            with pytest.raises(grpc.RpcError) as info:
                call.result(30)
            elapsed = time.monotonic() - t0
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "merge service" in info.value.details()
        assert elapsed < 15, f"answered after {elapsed:.1f} s for a 12 s deadline"
        # Nothing half received was kept or loaded; the service still serves the base model.
        assert loaded(stack) == before_loaded
        assert stack.adapter_folders() == before_folders
        assert generate(stack).completion_tokens > 0
    finally:
        stack.proxy.throttle(None)
        stack.restart_merge()
    assert generate(stack, target).completion_tokens > 0  # back: the same spec now loads


def test_merge_service_killed_mid_stream_then_restarted_the_fetch_resumes(hardened_stack: Stack) -> None:
    stack = hardened_stack
    target = spec(("e", 0.45), ("c", 0.55))
    retries = stack.inference.metric("loramerge_inference_merge_retries_total", {"code": "UNAVAILABLE"})
    stack.proxy.throttle(SLOW)
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(generate, stack, target, 180)
            stream_in_flight(stack, call, 96 * 1024)
            stack.kill_merge()
            stack.proxy.throttle(None)
            stack.restart_merge()  # the inference service keeps retrying meanwhile
            reply = call.result(120)
    finally:
        stack.proxy.throttle(None)
        if not stack.merge.running:
            stack.restart_merge()

    assert reply.completion_tokens > 0 and not reply.adapter.already_loaded
    assert (
        stack.inference.metric("loramerge_inference_merge_retries_total", {"code": "UNAVAILABLE"}) > retries
    )
    # The retry resumed where the broken stream stopped, not from byte 0.
    received = [
        e["received"] for e in stack.log_events(stack.inference, "merge service call failed; retrying")
    ]
    assert received and max(received) > 0
    resumed = [e for e in stack.log_events(stack.merge, "merge streamed") if e["offset"] > 0]
    assert resumed and resumed[-1]["merge_key"] == reply.adapter.merge_key

    # What was loaded is byte for byte what the merge service makes for this spec.
    key, data = merged_bytes(stack, target)
    assert key == reply.adapter.merge_key
    lora_int_id = int(reply.adapter.name.rsplit("-", 1)[1])
    [folder] = [f for f in stack.run_dir().iterdir() if f.name.startswith(f"{lora_int_id:08d}-")]
    assert (folder / "adapter_model.safetensors").read_bytes() == data
    assert_folders_match_listing(stack)

    # And it generates what a clean fetch of the same spec generates.
    stack.inference_stub().UnloadAdapter(
        I.UnloadAdapterRequest(merge_key=key), metadata=stack.inference_admin_metadata, timeout=30
    )
    clean = generate(stack, target)
    assert not clean.adapter.already_loaded
    assert list(clean.token_ids) == list(reply.token_ids)


def test_corrupt_disk_cache_entry_is_rebuilt_across_the_hop(hardened_stack: Stack) -> None:
    stack = hardened_stack
    target = spec(("a", 0.8), ("b", 0.2))
    first = generate(stack, target)
    key = first.adapter.merge_key
    data_file = stack.cache_dir / f"{key}.safetensors"
    good = data_file.read_bytes()

    stack.kill_merge()  # a crash; then the disk goes bad under the entry
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    data_file.write_bytes(bytes(damaged))
    stack.restart_merge()
    stack.inference_stub().UnloadAdapter(
        I.UnloadAdapterRequest(merge_key=key), metadata=stack.inference_admin_metadata, timeout=30
    )

    again = generate(stack, target)
    assert again.adapter.merge_key == key and not again.adapter.merge_cache_hit
    assert list(again.token_ids) == list(first.token_ids)
    assert stack.merge.metric("loramerge_merge_cache_corrupt_total") == 1
    assert stack.merge.metric("loramerge_merge_builds_total") == 1
    assert data_file.read_bytes() == good  # rebuilt and rewritten
    assert_folders_match_listing(stack)
