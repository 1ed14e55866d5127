"""Draining in-process: once stop begins, health is NOT_SERVING, ``drain.draining`` is set (the hook
HTTP front-ends read), every new call is UNAVAILABLE with a retry-after, and the call in flight
still finishes before grpc is stopped."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.drain import DrainState
from tests.client.conftest import PLAIN, serve_fakes

REQUEST = merge_pb2.MergeRequest(spec=merge_pb2.MergeSpec(ids=["a"]))


def test_stop_refuses_new_calls_unavailable_and_finishes_the_one_in_flight() -> None:
    thread, merge, _ = serve_fakes(PLAIN)
    with thread as server, grpc.insecure_channel(server.address) as channel:
        stub = merge_pb2_grpc.MergeServiceStub(channel)
        stub.Plan(REQUEST, timeout=10)  # connected
        merge.delay = 1.5
        slow: dict = {}
        t = threading.Thread(target=lambda: slow.setdefault("reply", stub.Plan(REQUEST, timeout=30)))
        t.start()
        time.sleep(0.3)
        assert server.drain.in_flight == 1
        stopping = asyncio.run_coroutine_threadsafe(server.stop(10), thread.loop)
        time.sleep(0.2)
        assert server.drain.draining
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        merge.delay = 0.0
        try:
            stub.Plan(REQUEST, timeout=5)
            raise AssertionError("a new call was accepted while draining")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert dict(e.trailing_metadata() or ()).get("retry-after") == "1"
        assert not stopping.done()  # grpc is not stopped while a call is in flight
        t.join(10)
        assert slow["reply"].merge_key
        stopping.result(10)
        thread.server = None  # already stopped


def test_drain_state_counts_and_waits() -> None:
    async def main() -> None:
        state = DrainState(retry_after_seconds=2)
        assert await state.wait_idle(0)
        with state.track():
            assert state.in_flight == 1 and not await state.wait_idle(0.05)
        assert state.in_flight == 0 and await state.wait_idle(0)
        state.start_draining()
        assert state.draining and state.retry_after_seconds == 2

    asyncio.run(main())
