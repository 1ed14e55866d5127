"""asyncio clients: the same methods as ``loramerge_client.client``, as coroutines.

async with AsyncInferenceClient("127.0.0.1:50051") as client:
    async for delta in client.generate_stream("Hello", MergedAdapters(ids=["a", "b"])):
        print(delta.text, end="")
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramerge.receiver import ProgressCallback
from loramerge.stream import folder_chunks, merge_method
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2, merge_pb2_grpc
from loramerge_client.client import (
    DEFAULT_INFERENCE_ADDR,
    DEFAULT_MERGE_ADDR,
    INFERENCE_SERVICE,
    MERGE_SERVICE,
)
from loramerge_client.errors import from_rpc_error
from loramerge_client.receiver import MergeReceiver, MergeResult
from loramerge_client.retry import Deadline, Retrier, RetryPolicy
from loramerge_client.tls import TlsLike, call_metadata, open_aio_channel
from loramerge_client.types import AdapterChoice, SamplingParams, SpecLike, generate_request, to_merge_spec

T = TypeVar("T")
MergeChunk = merge_pb2.MergeChunk


class _AsyncClient:
    default_address = ""
    default_env = ""
    service_name = ""

    def __init__(
        self,
        address: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        tls: TlsLike = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address or os.environ.get(self.default_env) or self.default_address
        self._owns_channel = channel is None
        self.channel = channel or open_aio_channel(self.address, tls, options)
        self.metadata = call_metadata(token, metadata)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _retrier(self, timeout: float | None) -> Retrier:
        return Retrier(self.retry, Deadline(self.timeout if timeout is None else timeout))

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        retrier = self._retrier(timeout)
        while True:
            try:
                return await method(request, timeout=retrier.timeout(), metadata=self.metadata)
            except grpc.RpcError as err:
                await retrier.after_failure_async(err)

    async def health(self, service: str | None = None, *, timeout: float | None = None) -> str:
        name = self.service_name if service is None else service
        resp = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=name), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncMergeClient(_AsyncClient):
    default_address = DEFAULT_MERGE_ADDR
    default_env = "MERGE_ADDR"
    service_name = MERGE_SERVICE

    def __init__(self, address: str | None = None, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self.stub = merge_pb2_grpc.MergeServiceStub(self.channel)
        # Merge with data chunks decoded as views into the received messages (no protobuf copies).
        self._merge = merge_method(self.channel)

    async def merge(
        self,
        spec: SpecLike,
        *,
        output_dir: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> MergeResult:
        """See ``MergeClient.merge``: verified, resumed after UNAVAILABLE, optionally written."""
        spec_pb = to_merge_spec(spec)
        receiver = MergeReceiver(on_progress)
        retrier = self._retrier(timeout)
        while True:
            request = receiver.request(spec_pb)
            call = self._merge(request, timeout=retrier.timeout(), metadata=self.metadata)
            try:
                async for chunk in call:
                    receiver.feed(chunk)
                break
            except grpc.RpcError as err:
                await retrier.after_failure_async(err)
            finally:
                call.cancel()
        result = receiver.result()
        if output_dir is not None:
            result.write(output_dir)
        return result

    async def merge_chunks(
        self, spec: SpecLike, *, timeout: float | None = None
    ) -> AsyncIterator[merge_pb2.MergeChunk]:
        request = merge_pb2.MergeRequest(spec=to_merge_spec(spec))
        t = self.timeout if timeout is None else timeout
        call = self.stub.Merge(request, timeout=t, metadata=self.metadata)
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    async def plan(
        self, spec: SpecLike, *, interference: bool = False, timeout: float | None = None
    ) -> merge_pb2.PlanResponse:
        request = merge_pb2.MergeRequest(spec=to_merge_spec(spec), interference=interference)
        return await self._unary(self.stub.Plan, request, timeout)

    async def list_cached(self, *, timeout: float | None = None) -> merge_pb2.ListCachedResponse:
        return await self._unary(self.stub.ListCached, merge_pb2.ListCachedRequest(), timeout)

    async def evict(self, merge_key: str = "", *, all: bool = False, timeout: float | None = None) -> int:
        req = merge_pb2.EvictRequest(merge_key=merge_key, all=all)
        return (await self._unary(self.stub.Evict, req, timeout)).evicted


class AsyncInferenceClient(_AsyncClient):
    default_address = DEFAULT_INFERENCE_ADDR
    default_env = "INFERENCE_ADDR"
    service_name = INFERENCE_SERVICE

    def __init__(self, address: str | None = None, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    async def generate(
        self,
        prompt: str,
        adapter: AdapterChoice = None,
        sampling: SamplingParams | inference_pb2.SamplingParams | None = None,
        *,
        merge_key: str = "",
        request_id: str = "",
        timeout: float | None = None,
    ) -> inference_pb2.GenerateResponse:
        req = generate_request(prompt, adapter, sampling, merge_key=merge_key, request_id=request_id)
        return await self._unary(self.stub.Generate, req, timeout)

    async def generate_stream(
        self,
        prompt: str,
        adapter: AdapterChoice = None,
        sampling: SamplingParams | inference_pb2.SamplingParams | None = None,
        *,
        merge_key: str = "",
        request_id: str = "",
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        """Text deltas; retried on UNAVAILABLE only before the first message.
        With ``on_progress``, a merge the service builds for this request reports its progress there
        before the first token (GenerateRequest.merge_progress); progress messages are not yielded."""
        req = generate_request(prompt, adapter, sampling, merge_key=merge_key, request_id=request_id)
        req.merge_progress = on_progress is not None
        retrier = self._retrier(timeout)
        while True:
            call = self.stub.GenerateStream(req, timeout=retrier.timeout(), metadata=self.metadata)
            received = False
            try:
                async for msg in call:
                    if on_progress is not None and msg.HasField("merge_progress"):
                        on_progress(msg.merge_progress)
                        continue
                    received = True
                    yield msg
                return
            except grpc.RpcError as err:
                if received:
                    raise from_rpc_error(err) from err
                await retrier.after_failure_async(err)
            finally:
                call.cancel()

    async def load_adapter(
        self,
        source: MergeResult | str | Path | Iterable[MergeChunk] | AsyncIterator[MergeChunk],
        *,
        merge_key: str = "",
        timeout: float | None = None,
    ) -> inference_pb2.LoadAdapterResponse:
        """See ``InferenceClient.load_adapter``; also takes an async iterator of chunks."""
        if isinstance(source, MergeResult):
            return await self._unary(_load_with(self.stub, source.chunks), None, timeout)
        if isinstance(source, str | Path):
            folder = Path(source)
            return await self._unary(
                _load_with(self.stub, lambda: folder_chunks(folder, merge_key=merge_key)), None, timeout
            )
        t = self.timeout if timeout is None else timeout
        try:
            return await self.stub.LoadAdapter(_skip_progress(source), timeout=t, metadata=self.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def list_adapters(self, *, timeout: float | None = None) -> inference_pb2.ListAdaptersResponse:
        return await self._unary(self.stub.ListAdapters, inference_pb2.ListAdaptersRequest(), timeout)

    async def unload_adapter(
        self, merge_key: str = "", *, name: str = "", timeout: float | None = None
    ) -> bool:
        req = inference_pb2.UnloadAdapterRequest(merge_key=merge_key, name=name)
        return (await self._unary(self.stub.UnloadAdapter, req, timeout)).unloaded


def _load_with(stub: Any, make_chunks: Callable[[], Iterable]) -> Callable:
    """A unary-shaped callable that sends a fresh chunk stream on each (retried) attempt."""

    def call(_: None, **kwargs: Any) -> Awaitable[inference_pb2.LoadAdapterResponse]:
        return stub.LoadAdapter(make_chunks(), **kwargs)

    return call


async def _skip_progress(
    chunks: Iterable[merge_pb2.MergeChunk] | AsyncIterator[merge_pb2.MergeChunk],
) -> AsyncIterator[merge_pb2.MergeChunk]:
    if hasattr(chunks, "__aiter__"):
        async for chunk in chunks:
            if chunk.WhichOneof("item") != "progress":
                yield chunk
    else:
        for chunk in chunks:
            if chunk.WhichOneof("item") != "progress":
                yield chunk
