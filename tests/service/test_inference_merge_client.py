"""The inference service's merge client against a scripted MergeService on a loopback grpc.aio server:
retry with back-off while unavailable, resume of a broken stream, error mapping, give-up at the deadline."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from inference_service.merge_client import MergeClient
from inference_service.receiver import AdapterLimits, AdapterWriter
from inference_service.request_specs import single_adapter_field
from inference_service.settings import MergeClientSettings
from loramerge.errors import DeadlineExceeded, FailedPrecondition, NotFound, Unavailable, to_rpc_status
from loramerge.v1 import merge_pb2 as M
from loramerge.v1 import merge_pb2_grpc

DATA = bytes(range(256)) * 40
LIMITS = AdapterLimits(base_model="base", max_rank=16, max_bytes=1 << 20)
HEADER = dict(
    merge_key="k",
    adapter_config_json=json.dumps({"r": 4, "base_model_name_or_path": "base"}),
    total_bytes=len(DATA),
    sha256=hashlib.sha256(DATA).hexdigest(),
    rank=4,
    base_model="base",
)


class Scripted(merge_pb2_grpc.MergeServiceServicer):
    """Fails the first ``unavailable`` calls, breaks the first stream after ``break_after`` bytes."""

    def __init__(self, unavailable: int = 0, break_after: int | None = None, error=None) -> None:
        self.unavailable = unavailable
        self.break_after = break_after
        self.error = error
        self.requests: list[M.MergeRequest] = []

    async def Plan(self, request, context):
        self.requests.append(request)
        if self.error is not None:
            await context.abort_with_status(to_rpc_status(self.error))
        if self.unavailable > 0:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return M.PlanResponse(merge_key=HEADER["merge_key"], rank=4)

    async def Merge(self, request, context):
        self.requests.append(request)
        if self.error is not None:
            await context.abort_with_status(to_rpc_status(self.error))
        if self.unavailable > 0:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        offset = request.resume_offset
        yield M.MergeChunk(header=M.MergeHeader(offset=offset, **HEADER))
        for start in range(offset, len(DATA), 1000):
            if self.break_after is not None and start >= self.break_after:
                self.break_after = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            yield M.MergeChunk(data=M.DataChunk(offset=start, data=DATA[start : start + 1000]))
        yield M.MergeChunk(trailer=M.MergeTrailer(total_bytes=len(DATA), sha256=HEADER["sha256"]))


async def fetch(
    servicer: Scripted | None,
    tmp_path: Path,
    timeout: float = 10,
    *,
    plan: bool = False,
    max_attempts: int = 0,
    **spec_kw,
):
    """Fetch spec "a" from ``servicer`` (None: a closed port); ``plan``: ask Plan for its key instead."""
    server = grpc.aio.server()
    merge_pb2_grpc.add_MergeServiceServicer_to_server(servicer or Scripted(), server)
    if servicer is None:  # nobody listens: connections are refused
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    settings = MergeClientSettings(
        merge_service=f"127.0.0.1:{port}",
        merge_retry_initial_seconds=0.05,
        merge_retry_max_seconds=0.2,
        merge_retry_max_attempts=max_attempts,
    )
    client = MergeClient(settings)
    writer = AdapterWriter(tmp_path / "out", LIMITS)
    spec = M.MergeSpec(adapters=[M.AdapterRef(id="a")])
    try:
        if plan:
            return await client.plan(spec, deadline=time.monotonic() + timeout, **spec_kw)
        return await client.fetch(spec, writer, deadline=time.monotonic() + timeout, **spec_kw)
    finally:
        await client.close()
        await server.stop(0)


def test_retries_while_unavailable_then_succeeds(tmp_path):
    servicer = Scripted(unavailable=3)
    got = asyncio.run(fetch(servicer, tmp_path))
    assert got.attempts == 4 and got.resumed == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == DATA


def test_a_broken_stream_resumes_from_the_last_byte(tmp_path):
    servicer = Scripted(break_after=4000)
    got = asyncio.run(fetch(servicer, tmp_path))
    assert got.resumed == 1
    assert [r.resume_offset for r in servicer.requests] == [0, 4000]
    assert servicer.requests[1].expected_merge_key == "k"
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == DATA


def test_gives_up_with_unavailable_at_the_deadline(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"merge service 127\.0\.0\.1:\d+ unavailable: \d+ attempt"):
        asyncio.run(fetch(None, tmp_path, timeout=1.0))
    assert time.monotonic() - t0 < 3


def test_domain_errors_keep_their_code_and_name_our_fields(tmp_path):
    err = NotFound("adapter 'zz' not found under the adapter root", field="spec.adapters[0].id")
    with pytest.raises(NotFound) as info:
        asyncio.run(fetch(Scripted(error=err), tmp_path, field_namer=single_adapter_field))
    assert info.value.field == "adapter_id" and "merge service: adapter 'zz' not found" in info.value.message
    err = FailedPrecondition("spec.target_rank 32 exceeds max_rank 16", field="spec.target_rank")
    with pytest.raises(FailedPrecondition, match=r"merged_adapters\.target_rank 32") as info:
        asyncio.run(fetch(Scripted(error=err), tmp_path))
    assert info.value.field == "merged_adapters.target_rank"


def test_deadline_exceeded_from_the_server_is_reported_as_such(tmp_path):
    class Slow(Scripted):
        async def Merge(self, request, context):
            await asyncio.sleep(5)
            yield M.MergeChunk()

    with pytest.raises(DeadlineExceeded, match="before the deadline"):
        asyncio.run(fetch(Slow(), tmp_path, timeout=0.5))


def test_backoff_doubles_up_to_the_cap():
    """The client library's policy (loramerge_client.retry), configured from the service's settings."""
    settings = MergeClientSettings(
        merge_retry_initial_seconds=0.1, merge_retry_max_seconds=0.5, merge_retry_jitter=0.0
    )
    policy = settings.merge_retry_policy()
    assert [round(policy.backoff(k), 3) for k in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    jittered = MergeClientSettings(merge_retry_initial_seconds=1.0).merge_retry_policy()
    assert all(0.8 <= jittered.backoff(1) <= 1.2 for _ in range(100))
    assert {c.name for c in policy.retry_codes} == {"UNAVAILABLE", "ABORTED", "CANCELLED"}
    assert MergeClientSettings(merge_retry_max_attempts=3).merge_retry_policy().max_attempts == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED])
def test_aborted_and_server_cancelled_are_retried_like_unavailable(tmp_path, code):
    """A build that found an input rewritten since its plan (ABORTED) and a call grpc dropped while
    its server stopped (CANCELLED) are retried, as the client library does."""

    class Once(Scripted):
        async def Merge(self, request, context):
            if not self.requests:
                self.requests.append(request)
                await context.abort(code, "try again")
            self.requests.append(request)
            async for chunk in super().Merge(request, context):
                yield chunk

    got = asyncio.run(fetch(Once(), tmp_path))
    assert got.attempts == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == DATA


def test_max_attempts_stops_before_the_deadline(tmp_path):
    servicer = Scripted(unavailable=10)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"unavailable: 3 attempt\(s\)"):
        asyncio.run(fetch(servicer, tmp_path, timeout=30, max_attempts=3))
    assert time.monotonic() - t0 < 5


def test_progress_items_reach_on_progress(tmp_path):
    class Building(Scripted):
        async def Merge(self, request, context):
            for done in range(3):
                yield M.MergeChunk(progress=M.MergeProgress(stage="merge", done=done, total=2))
            async for chunk in super().Merge(request, context):
                yield chunk

    seen: list[tuple[str, int, int]] = []
    got = asyncio.run(
        fetch(Building(), tmp_path, on_progress=lambda p: seen.append((p.stage, p.done, p.total)))
    )
    assert seen == [("merge", 0, 2), ("merge", 1, 2), ("merge", 2, 2)]
    assert got.received.bytes == len(DATA)


def test_plan_asks_once_for_the_merge_key(tmp_path):
    servicer = Scripted()
    assert asyncio.run(fetch(servicer, tmp_path, plan=True)) == "k"
    assert len(servicer.requests) == 1 and servicer.requests[0].spec.adapters[0].id == "a"


def test_plan_does_not_retry_an_unavailable_merge_service(tmp_path):
    servicer = Scripted(unavailable=1)
    with pytest.raises(Unavailable, match="unavailable: UNAVAILABLE: warming up"):
        asyncio.run(fetch(servicer, tmp_path, plan=True))
    assert len(servicer.requests) == 1
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"merge service 127\.0\.0\.1:\d+ unavailable"):
        asyncio.run(fetch(None, tmp_path, timeout=5, plan=True))
    assert time.monotonic() - t0 < 3  # refused at once, not retried until the deadline


def test_plan_errors_keep_their_code_and_name_our_fields(tmp_path):
    err = NotFound("adapter 'zz' not found under the adapter root", field="spec.adapters[0].id")
    with pytest.raises(NotFound) as info:
        asyncio.run(fetch(Scripted(error=err), tmp_path, plan=True, field_namer=single_adapter_field))
    assert info.value.field == "adapter_id" and "merge service: adapter 'zz' not found" in info.value.message


def test_plan_past_its_deadline_is_deadline_exceeded(tmp_path):
    class Slow(Scripted):
        async def Plan(self, request, context):
            await asyncio.sleep(5)
            return M.PlanResponse(merge_key="k")

    with pytest.raises(DeadlineExceeded, match="did not answer Plan within"):
        asyncio.run(fetch(Slow(), tmp_path, timeout=0.5, plan=True))


class SlowBreak(Scripted):
    """The header comes at once; the stream then stalls 0.4 s and breaks (the first time)."""

    async def Merge(self, request, context):
        self.requests.append(request)
        offset = request.resume_offset
        yield M.MergeChunk(header=M.MergeHeader(offset=offset, **HEADER))
        if offset == 0:
            yield M.MergeChunk(data=M.DataChunk(offset=0, data=DATA[:1000]))
            await asyncio.sleep(0.4)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        for start in range(offset, len(DATA), 1000):
            yield M.MergeChunk(data=M.DataChunk(offset=start, data=DATA[start : start + 1000]))
        yield M.MergeChunk(trailer=M.MergeTrailer(total_bytes=len(DATA), sha256=HEADER["sha256"]))


def test_header_ms_of_a_resumed_fetch_is_taken_at_the_header(tmp_path):
    """The time to the header is when the header came, not when the stream later broke."""
    got = asyncio.run(fetch(SlowBreak(), tmp_path))
    assert got.resumed == 1
    assert got.received.header_ms < 300 <= got.received.transfer_ms, got.received
