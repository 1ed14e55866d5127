"""The InferenceService servicer on a real loopback gRPC server, with a scripted engine instead of vLLM.

What this covers that the end-to-end tests cannot cheaply: the service answers (UNAVAILABLE, health
NOT_SERVING) while the engine is still starting, and a client that goes away mid-stream releases
its adapter lease and closes the engine's stream (which is what aborts the request inside vLLM).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_service.receiver import AdapterLimits
from inference_service.registry import AdapterRegistry
from inference_service.server import SERVICE_NAME
from inference_service.servicer import InferenceServicer
from inference_service.vllm_engine import EngineInfo
from loramerge.v1 import inference_pb2 as I
from loramerge.v1 import inference_pb2_grpc
from loramerge.v1 import merge_pb2 as M
from loramerge_common.server import GrpcServer, ServerSettings, Service
from loramerge_common.testing import ServerThread
from tests.unit.test_inference_registry import FakeEngine, FakeMergeService


class ScriptedEngine(FakeEngine):
    """Yields one token per step; remembers which streams were closed before they finished."""

    info = EngineInfo(
        "m", "base", max_lora_rank=16, max_model_len=512, base_via_zero_adapter=True, device="cpu"
    )

    def __init__(self) -> None:
        super().__init__()
        self.closed_early: list[str] = []
        self.step_seconds = 0.0

    def lora_request(self, name, lora_int_id=0, path=None):
        return name

    async def generate(self, prompt, params, request_id, lora_request):
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step_seconds)
                done = i == params.max_tokens - 1
                yield SimpleNamespace(
                    prompt_token_ids=[1, 2, 3],
                    finished=done,
                    outputs=[
                        SimpleNamespace(
                            token_ids=[10 + i],
                            text=f"<{lora_request}:{i}>",
                            finish_reason="length",
                            stop_reason=None,
                            logprobs=None,
                        )
                    ],
                )
        except (GeneratorExit, asyncio.CancelledError):  # what makes vLLM abort the request
            self.closed_early.append(request_id)
            raise


@pytest.fixture(scope="module", autouse=True)
def _vllm_imported() -> None:
    """The servicer builds vllm.SamplingParams; import vLLM (seconds) before any call's clock starts."""
    import vllm  # noqa: F401


@pytest.fixture
def served(tmp_path: Path):
    engine, merges = ScriptedEngine(), FakeMergeService()
    registry = AdapterRegistry(
        engine,
        merges,
        adapter_dir=tmp_path / "adapters",
        limits=AdapterLimits(base_model="base", max_rank=16, max_bytes=1 << 20),
        max_loaded=4,
    )
    servicer = InferenceServicer()
    loops: list[asyncio.AbstractEventLoop] = []

    async def make() -> GrpcServer:
        loops.append(asyncio.get_running_loop())
        server = GrpcServer(
            ServerSettings(listen="127.0.0.1:0"),
            [Service(SERVICE_NAME, servicer, inference_pb2_grpc.add_InferenceServiceServicer_to_server)],
            serving_at_start=False,
        )
        await server.start()
        return server

    with ServerThread(make) as server, grpc.insecure_channel(server.address) as channel:
        yield SimpleNamespace(
            server=server,
            servicer=servicer,
            engine=engine,
            registry=registry,
            loop=loops[0],
            stub=inference_pb2_grpc.InferenceServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )


def health(served) -> int:
    return served.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


def test_while_the_engine_starts_calls_get_unavailable_and_health_is_not_serving(served):
    assert health(served) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        served.stub.Generate(I.GenerateRequest(prompt="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "still starting" in info.value.details()


def test_generate_and_stream_report_tokens_and_the_adapter(served):
    served.servicer.attach(served.engine, served.registry)
    request = I.GenerateRequest(prompt="x", adapter_id="a", sampling=I.SamplingParams(max_tokens=3))
    r = served.stub.Generate(request, timeout=10)
    assert list(r.token_ids) == [10, 11, 12] and r.completion_tokens == 3 and r.prompt_tokens == 3
    assert r.finish_reason == I.LENGTH and r.adapter.merge_key == "a" and not r.adapter.already_loaded
    assert r.text == "".join(f"<{r.adapter.name}:{i}>" for i in range(3))
    messages = list(served.stub.GenerateStream(request, timeout=10))
    assert [m.completion_tokens for m in messages] == [1, 2, 3]
    assert messages[0].adapter.already_loaded and not messages[1].HasField("adapter")
    base = served.stub.Generate(I.GenerateRequest(prompt="x"), timeout=10)
    assert base.text.startswith("<None:0>") and base.completion_tokens == 16  # max_tokens 0 means 16


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"adapter_id": "a", "merge_key": "k"}, "adapter_id, merge_key"),
        ({"adapter_weight": 0.5}, "adapter_weight is set but adapter_id is empty"),
        ({"sampling": I.SamplingParams(top_p=1.5)}, "sampling.top_p must be in (0, 1]"),
        ({"sampling": I.SamplingParams(max_tokens=9999)}, "max_model_len 512, got 9999"),
        (
            {"sampling": I.SamplingParams(max_tokens=4, min_tokens=5)},
            "sampling.min_tokens must be <= max_tokens 4",
        ),
    ],
)
def test_bad_requests_name_the_field(served, request_kw, field):
    served.servicer.attach(served.engine, served.registry)
    with pytest.raises(grpc.RpcError) as info:
        served.stub.Generate(I.GenerateRequest(prompt="x", **request_kw), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


def test_a_client_going_away_closes_the_engine_stream_and_releases_the_adapter(served):
    served.servicer.attach(served.engine, served.registry)
    served.engine.step_seconds = 0.05
    call = served.stub.GenerateStream(
        I.GenerateRequest(prompt="x", adapter_id="a", sampling=I.SamplingParams(max_tokens=200)), timeout=30
    )
    next(call)
    (entry,) = served.registry.entries()
    assert entry.leases == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while entry.leases or not served.engine.closed_early:
        assert time.monotonic() < deadline, (entry.leases, served.engine.closed_early)
        time.sleep(0.05)


def test_generate_stream_reports_merge_progress_before_the_first_token_when_asked(served):
    """merge_progress: the merge service's progress comes first, then tokens with the adapter usage
    on the first token's message; without it the stream is as before."""
    served.servicer.attach(served.engine, served.registry)
    merges = served.registry.fetcher
    merges.progress = [M.MergeProgress(stage="merge", done=d, total=4) for d in range(5)]
    request = I.GenerateRequest(
        prompt="x",
        adapter_id="p",
        sampling=I.SamplingParams(max_tokens=2),
        merge_progress=True,
        request_id="r",
    )
    messages = list(served.stub.GenerateStream(request, timeout=10))
    progress = [m for m in messages if m.HasField("merge_progress")]
    tokens = [m for m in messages if not m.HasField("merge_progress")]
    assert progress and messages[: len(progress)] == progress  # all before the first token
    assert all(m.merge_progress.stage == "merge" and m.merge_progress.total == 4 for m in progress)
    assert all(not m.text and not m.token_ids and m.request_id == "r" for m in progress)
    dones = [m.merge_progress.done for m in progress]
    assert dones == sorted(dones)
    assert [m.completion_tokens for m in tokens] == [1, 2] and tokens[0].adapter.merge_key == "p"

    # Not asked for (and for a loaded adapter nothing is merged anyway): the first message is a token's.
    merges.progress = [M.MergeProgress(stage="merge", done=1, total=4)]
    plain = I.GenerateRequest(prompt="x", adapter_id="q", sampling=I.SamplingParams(max_tokens=2))
    messages = list(served.stub.GenerateStream(plain, timeout=10))
    assert not any(m.HasField("merge_progress") for m in messages)
    assert messages[0].adapter.merge_key == "q"


def test_a_client_going_away_during_the_merge_leaves_no_lease(served):
    served.servicer.attach(served.engine, served.registry)
    merges = served.registry.fetcher
    merges.progress = [M.MergeProgress(stage="merge", done=0, total=4)]
    gate = asyncio.Event()
    merges.gate = gate
    call = served.stub.GenerateStream(
        I.GenerateRequest(prompt="x", adapter_id="slow", merge_progress=True), timeout=30
    )
    first = next(call)
    assert first.HasField("merge_progress") and first.merge_progress.total == 4
    call.cancel()
    time.sleep(0.2)
    served.loop.call_soon_threadsafe(gate.set)
    deadline = time.monotonic() + 10
    while not served.registry.entries():  # the shared fetch finishes for whoever asks next
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (entry,) = served.registry.entries()
    assert entry.leases == 0
