"""Engine death in the real ``serve()`` (gRPC server, registry, merge client) with a scripted engine.

With exit_on_engine_death (the default): health turns NOT_SERVING, a generation in flight and a
request waiting on an adapter fetch both fail UNAVAILABLE, and ``serve`` raises EngineDied (exit 3
from ``__main__``) within a few seconds. Without it: the service stays up, NOT_SERVING, until
stopped. tests/e2e/test_inference_e2e.py kills a real vLLM engine core.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import inference_service.__main__ as main_module
from inference_service import server as server_module
from inference_service.server import EngineDied, serve
from inference_service.settings import InferenceSettings
from loramerge.errors import Unavailable
from loramerge.v1 import inference_pb2 as I
from loramerge.v1 import inference_pb2_grpc, merge_pb2_grpc
from tests.service.test_inference_servicer import ScriptedEngine

HEALTH = health_pb2.HealthCheckResponse


@pytest.fixture(scope="module", autouse=True)
def _vllm_imported() -> None:
    """The servicer builds vllm.SamplingParams; import it (seconds) before any clock starts."""
    from vllm import SamplingParams  # noqa: F401


class DyingEngine(ScriptedEngine):
    """Streams until ``die()``, then fails as Engine.generate does once vLLM's engine is dead."""

    reserved_lora_slots = 0

    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        self.dead = asyncio.Event()
        self.shut_down = False

    def die(self) -> None:
        self.healthy = False
        self.dead.set()

    async def generate(self, prompt, params, request_id, lora_request):
        async for out in super().generate(prompt, params, request_id, lora_request):
            yield out
            await self.dead.wait()
            raise Unavailable("the vLLM engine has died; the service must be restarted")

    def shutdown(self) -> None:
        self.shut_down = True


class HangingMerge(merge_pb2_grpc.MergeServiceServicer):
    """A merge service that accepts Merge calls and never answers them."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def Merge(self, request, context):
        self.called.set()
        await asyncio.Event().wait()
        yield  # pragma: no cover


async def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides):
    engine, merge = DyingEngine(), HangingMerge()

    async def fake_start(cls, settings, work_dir):
        return engine

    monkeypatch.setattr(server_module.Engine, "start", classmethod(fake_start))
    merge_server = grpc.aio.server()
    merge_pb2_grpc.add_MergeServiceServicer_to_server(merge, merge_server)
    merge_port = merge_server.add_insecure_port("127.0.0.1:0")
    await merge_server.start()
    ready = tmp_path / "ready.json"
    settings = InferenceSettings(
        model="m",
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        metrics_port=0,
        merge_service=f"127.0.0.1:{merge_port}",
        adapter_dir=tmp_path / "adapters",
        ready_file=ready,
        log_format="text",
        **overrides,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and not task.done(), "the service did not start"
        await asyncio.sleep(0.02)
    channel = grpc.aio.insecure_channel(json.loads(ready.read_text())["address"])
    return engine, merge, merge_server, task, stop, channel


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def in_flight(channel: grpc.aio.Channel, merge: HangingMerge):
    """A streaming base-model generation past its first token, and a request waiting on a fetch."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    sampling = I.SamplingParams(max_tokens=100)
    stream = stub.GenerateStream(I.GenerateRequest(prompt="x", sampling=sampling), timeout=60)
    assert (await stream.read()).token_ids == [10]
    fetching = asyncio.ensure_future(
        stub.Generate(I.GenerateRequest(prompt="x", adapter_id="a", sampling=sampling), timeout=60)
    )
    await asyncio.wait_for(merge.called.wait(), 10)
    return stream, fetching


async def status_of(awaitable) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code(), info.value.details() or ""


async def read_all(stream):
    while await stream.read() is not grpc.aio.EOF:
        pass


def test_engine_death_fails_calls_in_flight_and_ends_serve_with_engine_died(tmp_path, monkeypatch):
    async def main():
        engine, merge, merge_server, task, _, channel = await start(
            tmp_path, monkeypatch, drain_seconds=2.0, grace_seconds=60.0
        )
        try:
            assert await health(channel) == HEALTH.SERVING
            stream, fetching = await in_flight(channel, merge)
            t0 = time.monotonic()
            engine.die()
            code, details = await status_of(read_all(stream))
            assert code == grpc.StatusCode.UNAVAILABLE and "engine has died" in details, details
            while await health(channel) != HEALTH.NOT_SERVING:  # the drain window shows it
                assert time.monotonic() - t0 < 5, "health did not turn NOT_SERVING"
                await asyncio.sleep(0.05)
            # failed by the service itself, not cut off when the server stops
            code, details = await status_of(fetching)
            assert code == grpc.StatusCode.UNAVAILABLE and "engine has died" in details, details
            with pytest.raises(EngineDied, match="engine has died"):
                await asyncio.wait_for(task, 15)
            # watchdog period + drain + at most ENGINE_DEATH_GRACE_SECONDS, not grace_seconds (60)
            assert time.monotonic() - t0 < 12
            assert engine.shut_down and not (tmp_path / "ready.json").exists()
            assert list((tmp_path / "adapters").iterdir()) == []
        finally:
            await channel.close()
            await merge_server.stop(0)
            task.cancel()

    asyncio.run(main())


def test_without_exit_on_engine_death_the_service_stays_up_not_serving(tmp_path, monkeypatch):
    async def main():
        engine, merge, merge_server, task, stop, channel = await start(
            tmp_path, monkeypatch, exit_on_engine_death=False, grace_seconds=1.0
        )
        try:
            stream, _ = await in_flight(channel, merge)
            engine.die()
            code, details = await status_of(read_all(stream))
            assert code == grpc.StatusCode.UNAVAILABLE and "engine has died" in details, details
            t0 = time.monotonic()
            while await health(channel) != HEALTH.NOT_SERVING:
                assert time.monotonic() - t0 < 5, "health did not turn NOT_SERVING"
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)
            assert not task.done() and await health(channel) == HEALTH.NOT_SERVING
            stop.set()
            await asyncio.wait_for(task, 15)  # a plain stop: no EngineDied
        finally:
            await channel.close()
            await merge_server.stop(0)
            task.cancel()

    asyncio.run(main())


def test_main_exits_3_when_the_engine_died(monkeypatch, capsys):
    async def dead(settings):
        raise EngineDied("the vLLM engine has died; the service is restarting")

    monkeypatch.setattr(main_module, "serve", dead)
    monkeypatch.setattr(main_module, "setup_logging", lambda *a: None)
    with pytest.raises(SystemExit) as info:
        main_module.main(["--model", "m"])
    assert info.value.code == main_module.EXIT_ENGINE_DIED == 3
    assert "engine has died" in capsys.readouterr().err
