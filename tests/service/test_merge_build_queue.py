"""The merge service bounds the builds waiting for a slot (max_queued_builds) on a real loopback server.

With one build slot and one queue place, a third distinct merge is refused at once with
RESOURCE_EXHAUSTED naming the limit, while a request for a key already building joins it; once the
builds finish, the refused merge succeeds.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import grpc
import pytest

from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.metrics import sample_value
from loramerge_common.testing import ServerThread
from merge_service.server import build_server
from merge_service.settings import MergeSettings

P = merge_pb2


def spec(weight: float) -> P.MergeSpec:
    return P.MergeSpec(adapters=[P.AdapterRef(id="a", weight=weight), P.AdapterRef(id="b", weight=0.5)])


def test_new_merges_beyond_the_queue_are_refused_while_joiners_wait(
    adapter_root: Path, tmp_path: Path
) -> None:
    settings = MergeSettings(
        listen="127.0.0.1:0",
        metrics_port=0,
        adapter_root=adapter_root,
        hub_cache_dir=tmp_path / "hub",
        s3_cache_dir=tmp_path / "s3",
        max_concurrent_builds=1,
        max_queued_builds=1,
        device="cpu",
        log_format="text",
    )
    release = threading.Event()
    started = threading.Event()
    holder = {}

    async def make():
        server, servicer = build_server(settings)
        real_build = servicer.merger.build

        def held_build(plan, progress=None):  # a slow merge: waits until the test lets it finish
            started.set()
            release.wait(60)
            return real_build(plan, progress)

        servicer.merger.build = held_build
        holder["servicer"] = servicer
        await server.start()
        return server

    with (
        ServerThread(make) as server,
        grpc.insecure_channel(server.address) as channel,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        stub = merge_pb2_grpc.MergeServiceStub(channel)

        def merge(weight: float) -> bytes:
            chunks = stub.Merge(P.MergeRequest(spec=spec(weight)), timeout=120)
            return b"".join(c.data.data for c in chunks if c.WhichOneof("item") == "data")

        running = pool.submit(merge, 0.1)
        assert started.wait(60)
        queued = pool.submit(merge, 0.2)
        flights = holder["servicer"].builds.flights
        deadline = time.monotonic() + 30
        while len(flights.in_flight()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(flights.in_flight()) == 2
        joiner = pool.submit(merge, 0.1)  # same key as the running build
        while sample_value(server.registry, "loramerge_merge_singleflight_joins_total") < 1:
            assert time.monotonic() < deadline and not joiner.done()
            time.sleep(0.02)

        with pytest.raises(grpc.RpcError) as info:
            merge(0.3)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_builds 1" in info.value.details()

        release.set()
        first, second, joined = running.result(120), queued.result(120), joiner.result(120)
        assert first and second and joined == first
        assert merge(0.3)  # room again
