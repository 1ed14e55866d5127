"""Blocking clients for the merge and inference services.

Every method takes an optional ``timeout`` (seconds, for the whole call including retries;
defaults to the client's), retries on UNAVAILABLE with backoff (the client's ``retry`` policy),
and raises ``LoramergeError`` subclasses carrying the status code and the field violations.

    with InferenceClient("127.0.0.1:50051") as client:
        spec = MergedAdapters(ids=["a", "b"], weights=[0.6, 0.4], merge_strategy="ties", density=0.5)
        print(client.generate("Hello", spec, SamplingParams(max_tokens=32)).text)
        for delta in client.generate_stream("Hello", spec):
            print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramerge.receiver import ProgressCallback
from loramerge.stream import folder_chunks, merge_method
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2, merge_pb2_grpc
from loramerge_client.errors import from_rpc_error
from loramerge_client.receiver import MergeReceiver, MergeResult
from loramerge_client.retry import Deadline, Retrier, RetryPolicy
from loramerge_client.tls import TlsLike, call_metadata, open_channel
from loramerge_client.types import AdapterChoice, SamplingParams, SpecLike, generate_request, to_merge_spec

DEFAULT_MERGE_ADDR = "127.0.0.1:50061"
DEFAULT_INFERENCE_ADDR = "127.0.0.1:50051"
MERGE_SERVICE = "loramerge.v1.MergeService"
INFERENCE_SERVICE = "loramerge.v1.InferenceService"

T = TypeVar("T")
LoadSource = MergeResult | str | Path | Iterable[merge_pb2.MergeChunk]


class _Client:
    """Channel, call metadata, deadlines and retries shared by both clients."""

    default_address = ""
    default_env = ""
    service_name = ""

    def __init__(
        self,
        address: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        tls: TlsLike = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address or os.environ.get(self.default_env) or self.default_address
        self._owns_channel = channel is None
        self.channel = channel or open_channel(self.address, tls, options)
        self.metadata = call_metadata(token, metadata)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrier(self, timeout: float | None) -> Retrier:
        return Retrier(self.retry, Deadline(self.timeout if timeout is None else timeout))

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        retrier = self._retrier(timeout)
        while True:
            try:
                return method(request, timeout=retrier.timeout(), metadata=self.metadata)
            except grpc.RpcError as err:
                retrier.after_failure(err)

    def health(self, service: str | None = None, *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status ("SERVING", "NOT_SERVING", ...) of ``service`` (default: this
        client's service; "" asks about the server as a whole)."""
        name = self.service_name if service is None else service
        resp = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=name), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class MergeClient(_Client):
    """Client of loramerge.v1.MergeService (address default: $MERGE_ADDR or 127.0.0.1:50061)."""

    default_address = DEFAULT_MERGE_ADDR
    default_env = "MERGE_ADDR"
    service_name = MERGE_SERVICE

    def __init__(self, address: str | None = None, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self.stub = merge_pb2_grpc.MergeServiceStub(self.channel)
        # Merge with data chunks decoded as views into the received messages (no protobuf copies).
        self._merge = merge_method(self.channel)

    def merge(
        self,
        spec: SpecLike,
        *,
        output_dir: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> MergeResult:
        """Build (or fetch from cache) the merged adapter, verify its sha256, optionally write it.

        A stream broken by UNAVAILABLE (e.g. the service restarted) is resumed from the last byte
        received, pinned to the first attempt's merge key.
        """
        spec_pb = to_merge_spec(spec)
        receiver = MergeReceiver(on_progress)
        retrier = self._retrier(timeout)
        while True:
            request = receiver.request(spec_pb)
            try:
                call = self._merge(request, timeout=retrier.timeout(), metadata=self.metadata)
            except grpc.RpcError as err:
                retrier.after_failure(err)
                continue
            try:
                receiver.feed_all(call)
                break
            except grpc.RpcError as err:
                retrier.after_failure(err)
            finally:
                call.cancel()
        result = receiver.result()
        if output_dir is not None:
            result.write(output_dir)
        return result

    def merge_chunks(self, spec: SpecLike, *, timeout: float | None = None) -> Iterator[merge_pb2.MergeChunk]:
        """The raw Merge stream (no retry), e.g. to pipe into ``InferenceClient.load_adapter``."""
        request = merge_pb2.MergeRequest(spec=to_merge_spec(spec))
        t = self.timeout if timeout is None else timeout
        call = self.stub.Merge(request, timeout=t, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    def plan(
        self, spec: SpecLike, *, interference: bool = False, timeout: float | None = None
    ) -> merge_pb2.PlanResponse:
        """What ``merge`` would produce (merge key, rank, size, resolved adapters, cached or not);
        ``interference`` also asks how the adapters interfere (PlanResponse.interference)."""
        request = merge_pb2.MergeRequest(spec=to_merge_spec(spec), interference=interference)
        return self._unary(self.stub.Plan, request, timeout)

    def list_cached(self, *, timeout: float | None = None) -> merge_pb2.ListCachedResponse:
        return self._unary(self.stub.ListCached, merge_pb2.ListCachedRequest(), timeout)

    def evict(self, merge_key: str = "", *, all: bool = False, timeout: float | None = None) -> int:
        """Drop one cached merge (or all); returns how many were evicted."""
        req = merge_pb2.EvictRequest(merge_key=merge_key, all=all)
        return self._unary(self.stub.Evict, req, timeout).evicted


class InferenceClient(_Client):
    """Client of loramerge.v1.InferenceService (address default: $INFERENCE_ADDR or 127.0.0.1:50051).

    ``adapter`` in generate/generate_stream is None (base model), an ``Adapter`` or adapter id,
    a ``MergedAdapters`` / ``MergeSpec`` (merged on demand by the server); or pass ``merge_key``
    for an adapter already loaded.
    """

    default_address = DEFAULT_INFERENCE_ADDR
    default_env = "INFERENCE_ADDR"
    service_name = INFERENCE_SERVICE

    def __init__(self, address: str | None = None, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def generate(
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
        return self._unary(self.stub.Generate, req, timeout)

    def generate_stream(
        self,
        prompt: str,
        adapter: AdapterChoice = None,
        sampling: SamplingParams | inference_pb2.SamplingParams | None = None,
        *,
        merge_key: str = "",
        request_id: str = "",
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        """Text deltas as tokens are produced. Retried on UNAVAILABLE only before the first message
        (a retry after that would repeat text); closing the iterator cancels the call.
        With ``on_progress``, a merge the service builds for this request reports its progress there
        before the first token (GenerateRequest.merge_progress); progress messages are not yielded."""
        req = generate_request(prompt, adapter, sampling, merge_key=merge_key, request_id=request_id)
        req.merge_progress = on_progress is not None
        retrier = self._retrier(timeout)
        while True:
            call = self.stub.GenerateStream(req, timeout=retrier.timeout(), metadata=self.metadata)
            received = False
            try:
                for msg in call:
                    if on_progress is not None and msg.HasField("merge_progress"):
                        on_progress(msg.merge_progress)
                        continue
                    received = True
                    yield msg
                return
            except grpc.RpcError as err:
                if received:
                    raise from_rpc_error(err) from err
                retrier.after_failure(err)
            finally:
                call.cancel()

    def load_adapter(
        self, source: LoadSource, *, merge_key: str = "", timeout: float | None = None
    ) -> inference_pb2.LoadAdapterResponse:
        """Push an adapter: a ``MergeResult``, a PEFT folder path (``merge_key`` names it), or any
        iterable of MergeChunks such as ``MergeClient.merge_chunks(spec)`` (progress is skipped).
        Only re-readable sources (results, folders) are retried."""
        if isinstance(source, MergeResult):
            return self._retry_stream(source.chunks, timeout)
        if isinstance(source, str | Path):
            folder = Path(source)
            return self._retry_stream(lambda: folder_chunks(folder, merge_key=merge_key), timeout)
        chunks = (c for c in source if c.WhichOneof("item") != "progress")
        t = self.timeout if timeout is None else timeout
        try:
            return self.stub.LoadAdapter(chunks, timeout=t, metadata=self.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _retry_stream(
        self, make_chunks: Callable[[], Iterator[merge_pb2.MergeChunk]], timeout: float | None
    ) -> inference_pb2.LoadAdapterResponse:
        retrier = self._retrier(timeout)
        while True:
            try:
                return self.stub.LoadAdapter(make_chunks(), timeout=retrier.timeout(), metadata=self.metadata)
            except grpc.RpcError as err:
                retrier.after_failure(err)

    def list_adapters(self, *, timeout: float | None = None) -> inference_pb2.ListAdaptersResponse:
        return self._unary(self.stub.ListAdapters, inference_pb2.ListAdaptersRequest(), timeout)

    def unload_adapter(self, merge_key: str = "", *, name: str = "", timeout: float | None = None) -> bool:
        """Unload by merge key or vLLM LoRA name; True when something was unloaded."""
        req = inference_pb2.UnloadAdapterRequest(merge_key=merge_key, name=name)
        return self._unary(self.stub.UnloadAdapter, req, timeout).unloaded
