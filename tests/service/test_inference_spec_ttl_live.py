"""Spec TTL against the real merge service: a local adapter whose files change under the adapter root.

The inference side is the real registry and merge client (vLLM replaced by the unit tests' fake
engine, time by a fake clock). The oracle for the new key is the merge service's own Plan for an
adapter holding the same bytes under another id (keys are content-addressed).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest

from inference_service.merge_client import MergeClient
from inference_service.receiver import AdapterLimits
from inference_service.registry import AdapterRegistry
from inference_service.settings import MergeClientSettings
from loramerge.errors import NotFound
from loramerge.v1 import merge_pb2 as M
from loramerge.v1 import merge_pb2_grpc
from loramerge_common.metrics import sample_value
from loramerge_common.testing import ServerThread
from merge_service.server import build_server
from merge_service.settings import MergeSettings
from merge_service.sources import SourceResolver
from tests.unit.test_inference_registry import FakeEngine
from tests.unit.test_inference_spec_ttl import Clock

TTL = 60.0
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def root(adapter_root: Path, tmp_path: Path) -> Path:
    """An adapter root with "live" (a copy of a, to be overwritten) and "e" (the bytes it will get)."""
    out = tmp_path / "adapters"
    shutil.copytree(adapter_root / "a", out / "live")
    shutil.copytree(adapter_root / "e", out / "e")
    return out


def merge_server(root: Path, tmp: Path) -> ServerThread:
    settings = MergeSettings(
        listen="127.0.0.1:0",
        metrics_port=0,
        adapter_root=root,
        hub_cache_dir=tmp / "hub",
        s3_cache_dir=tmp / "s3",
        cache_memory_bytes=16 << 20,
        device="cpu",
        log_format="text",
    )
    resolver = SourceResolver(root, hub_cache_dir=tmp / "hub", hub_endpoint="http://127.0.0.1:9")

    async def make():
        server, _ = build_server(settings, resolver=resolver)
        await server.start()
        return server

    return ServerThread(make)


def calls(server, method: str) -> float:
    return sample_value(server.registry, "loramerge_rpc_requests_total", {"method": method})


def plan_key(address: str, adapter_id: str) -> str:
    with grpc.insecure_channel(address) as channel:
        spec = M.MergeSpec(adapters=[M.AdapterRef(id=adapter_id)], max_rank=64)
        return merge_pb2_grpc.MergeServiceStub(channel).Plan(M.MergeRequest(spec=spec), timeout=30).merge_key


def test_a_changed_local_adapter_gets_its_new_key_after_the_ttl_and_not_before(
    root: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    thread = merge_server(root, tmp_path)
    server = thread.start()
    spec = M.MergeSpec(adapters=[M.AdapterRef(id="live", source=M.AdapterSource.LOCAL)])
    clock = Clock()

    async def main() -> None:
        client = MergeClient(MergeClientSettings(merge_service=server.address, merge_retry_max_seconds=0.2))
        registry = AdapterRegistry(
            FakeEngine(),
            client,
            adapter_dir=tmp_path / "loaded",
            limits=AdapterLimits(base_model=str(tiny_llama), max_rank=64, max_bytes=64 << 20),
            max_loaded=4,
            spec_ttl=TTL,
            clock=clock,
        )

        async def use():
            async with await registry.for_spec(spec) as usage:
                return usage

        try:
            first = await use()
            old_key = first.entry.merge_key
            assert calls(server, "Merge") == 1

            for name in FILES:  # the adapter is replaced in place
                shutil.copyfile(root / "e" / name, root / "live" / name)
            new_key = await asyncio.to_thread(plan_key, server.address, "e")
            assert new_key != old_key

            clock.now += TTL - 1
            before = await use()
            assert before.entry is first.entry and before.already_loaded
            assert calls(server, "Plan") == 1 and calls(server, "Merge") == 1  # only the oracle's Plan

            clock.now += 1
            after = await use()
            assert after.entry.merge_key == new_key and not after.already_loaded
            assert after.entry.path != first.entry.path
            assert calls(server, "Plan") == 2 and calls(server, "Merge") == 2

            clock.now += TTL  # unchanged since: confirmed by Plan, no Merge
            again = await use()
            assert again.entry is after.entry and again.already_loaded
            assert calls(server, "Plan") == 3 and calls(server, "Merge") == 2

            shutil.rmtree(root / "live")  # the adapter is gone: fails as a new request would
            clock.now += TTL
            with pytest.raises(NotFound, match="live"):
                await use()

            shutil.copytree(root / "e", root / "live")
            await use()  # forgotten after the failure: Merge again, same key as loaded
            await asyncio.to_thread(thread.stop)  # the merge service goes away
            clock.now += TTL
            stale = await use()
            assert stale.entry is after.entry and stale.already_loaded
        finally:
            await registry.close()
            await client.close()

    try:
        asyncio.run(main())
    finally:
        thread.stop()
