"""gRPC InferenceService: parse the request, pick the adapter, generate, map errors to statuses."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc.aio
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2

from inference_service import sampling
from inference_service.engine import Engine
from inference_service.metrics import InferenceMetrics
from inference_service.registry import AdapterRegistry, Lease, Usage
from inference_service.specs import single_adapter_field, single_adapter_spec
from loramerge_common.errors import InvalidArgument, Unavailable, shown
from loramerge_common.metrics import RpcMetrics
from loramerge_common.rpc import rpc_method

log = logging.getLogger(__name__)

_FINISH = {
    "stop": inference_pb2.FinishReason.STOP,
    "length": inference_pb2.FinishReason.LENGTH,
    "abort": inference_pb2.FinishReason.ABORT,
}
DEADLINE_MARGIN_S = 0.1  # answer UNAVAILABLE before the caller's own deadline cuts the call


@dataclass
class Step:
    """One increment of a generation."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None
    usage: Usage | None = None  # set on the first step only
    completion_tokens: int = 0  # running total
    request_id: str = ""


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        registry: AdapterRegistry | None = None,
        engine: Engine | None = None,
        *,
        metrics: InferenceMetrics | None = None,
        rpc_metrics: RpcMetrics | None = None,
        merge_timeout_seconds: float = 120.0,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.rpc_metrics = rpc_metrics
        self.merge_timeout_seconds = merge_timeout_seconds

    def attach(self, engine: Engine, registry: AdapterRegistry) -> None:
        """The engine is ready: start serving (calls before this get UNAVAILABLE)."""
        self.engine = engine
        self.registry = registry

    # -- RPCs --------------------------------------------------------------------------------

    @rpc_method
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        response = inference_pb2.GenerateResponse()
        texts: list[str] = []
        step = None
        async for step in self._generate(request, context):
            if step.usage is not None:
                response.adapter.CopyFrom(adapter_usage(step.usage))
            texts.append(step.text)
            response.token_ids.extend(step.token_ids)
            response.prompt_tokens = step.prompt_tokens
            response.completion_tokens = step.completion_tokens
            if step.finish_reason:
                response.finish_reason = _FINISH.get(step.finish_reason, inference_pb2.FinishReason.STOP)
        response.text = "".join(texts)
        response.request_id = step.request_id if step else request.request_id
        return response

    @rpc_method
    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        async for step in self._generate(request, context):
            msg = inference_pb2.GenerateStreamResponse(
                text=step.text,
                token_ids=step.token_ids,
                prompt_tokens=step.prompt_tokens,
                completion_tokens=step.completion_tokens,
                request_id=step.request_id,
            )
            if step.usage is not None:
                msg.adapter.CopyFrom(adapter_usage(step.usage))
            if step.finish_reason:
                msg.finish_reason = _FINISH.get(step.finish_reason, inference_pb2.FinishReason.STOP)
            yield msg

    @rpc_method
    async def LoadAdapter(
        self, request_iterator: AsyncIterator[merge_pb2.MergeChunk], context: grpc.aio.ServicerContext
    ) -> inference_pb2.LoadAdapterResponse:
        registry, _ = self._ready()
        usage = await registry.load_pushed(request_iterator)
        return inference_pb2.LoadAdapterResponse(
            name=usage.entry.name,
            merge_key=usage.entry.merge_key,
            already_loaded=usage.already_loaded,
            load_ms=usage.load_ms,
        )

    @rpc_method
    async def ListAdapters(
        self, request: inference_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListAdaptersResponse:
        registry, engine = self._ready()
        return inference_pb2.ListAdaptersResponse(
            adapters=[
                inference_pb2.LoadedAdapter(
                    name=e.name,
                    merge_key=e.merge_key,
                    lora_int_id=e.lora_int_id,
                    rank=e.rank,
                    bytes=e.bytes,
                    base_model=e.base_model,
                    loaded_at=e.loaded_at,
                    last_used_at=e.last_used_at,
                    requests=e.requests,
                    description=e.description,
                )
                for e in registry.entries()
            ],
            max_loaded=registry.max_loaded,
            base_model=engine.info.model_name,
            max_lora_rank=engine.info.max_lora_rank,
        )

    @rpc_method
    async def UnloadAdapter(
        self, request: inference_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.UnloadAdapterResponse:
        registry, _ = self._ready()
        if bool(request.merge_key) == bool(request.name):
            raise InvalidArgument(
                "set exactly one of merge_key and name, got "
                f"merge_key={shown(request.merge_key)} name={shown(request.name)}",
                field="merge_key",
            )
        return inference_pb2.UnloadAdapterResponse(
            unloaded=await registry.unload(merge_key=request.merge_key, name=request.name)
        )

    # -- the generation path -----------------------------------------------------------------

    def _ready(self) -> tuple[AdapterRegistry, Engine]:
        if self.engine is None or self.registry is None:
            raise Unavailable("the inference engine is still starting; retry shortly")
        return self.registry, self.engine

    async def _generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Step]:
        t0 = time.perf_counter()
        registry, engine = self._ready()
        if not request.prompt:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        params = sampling.to_vllm(request.sampling, engine.info.max_model_len)
        request_id = request.request_id or uuid.uuid4().hex
        kind, lease = await self._adapter(request, context, registry)
        completion = 0
        first = True
        async with lease or contextlib.nullcontext() as usage:
            if usage is None:
                lora = engine.lora_request(None)
            else:
                lora = engine.lora_request(usage.entry.name, usage.entry.lora_int_id, usage.entry.path)
            try:
                async for out in engine.generate(
                    request.prompt, params, f"{request_id}-{uuid.uuid4().hex[:8]}", lora
                ):
                    result = out.outputs[0]
                    completion += len(result.token_ids)
                    if first and self.metrics:
                        self.metrics.first_token_seconds.labels(kind=kind).observe(time.perf_counter() - t0)
                    step = Step(
                        text=result.text,
                        token_ids=list(result.token_ids),
                        prompt_tokens=len(out.prompt_token_ids or ()),
                        finish_reason=result.finish_reason if out.finished else None,
                        usage=usage if first else None,
                        completion_tokens=completion,
                        request_id=request_id,
                    )
                    first = False
                    yield step
            except BaseException as e:
                if self.metrics and not isinstance(e, Exception):  # cancelled: vLLM aborted the request
                    self.metrics.aborted.inc()
                raise
        if self.metrics:
            self.metrics.generate_seconds.labels(kind=kind).observe(time.perf_counter() - t0)
            self.metrics.generations.labels(kind=kind, finish_reason=step.finish_reason or "none").inc()
            self.metrics.prompt_tokens.labels(kind=kind).inc(step.prompt_tokens)
            self.metrics.completion_tokens.labels(kind=kind).inc(completion)

    async def _adapter(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        registry: AdapterRegistry,
    ) -> tuple[str, Lease | None]:
        """Which weights the request asked for: (kind, lease on the adapter or None for the base)."""
        chosen = [
            name
            for name, present in (
                ("adapter_id", bool(request.adapter_id)),
                ("merged_adapters", request.HasField("merged_adapters")),
                ("merge_key", bool(request.merge_key)),
            )
            if present
        ]
        if len(chosen) > 1:
            raise InvalidArgument(
                f"set at most one of adapter_id, merged_adapters and merge_key, got {', '.join(chosen)}",
                field=chosen[1],
            )
        if not request.adapter_id:
            for name, present in (
                ("adapter_weight", request.HasField("adapter_weight")),
                ("adapter_revision", bool(request.adapter_revision)),
                ("adapter_source", bool(request.adapter_source)),
            ):
                if present:
                    raise InvalidArgument(f"{name} is set but adapter_id is empty", field=name)
        if not chosen:
            return "base", None
        if request.merge_key:
            return "key", registry.for_key(request.merge_key)
        deadline = self._deadline(context)
        if request.adapter_id:
            weight = request.adapter_weight if request.HasField("adapter_weight") else None
            spec = single_adapter_spec(
                request.adapter_id, request.adapter_source, request.adapter_revision, weight
            )
            return "adapter", await registry.for_spec(
                spec, deadline=deadline, field_namer=single_adapter_field
            )
        return "merged", await registry.for_spec(request.merged_adapters, deadline=deadline)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        budget = self.merge_timeout_seconds
        if remaining is not None:
            budget = min(budget, max(0.0, remaining - DEADLINE_MARGIN_S))
        return time.monotonic() + budget


def adapter_usage(usage: Usage) -> inference_pb2.AdapterUsage:
    e = usage.entry
    return inference_pb2.AdapterUsage(
        name=e.name,
        merge_key=e.merge_key,
        already_loaded=usage.already_loaded,
        merge_cache_hit=usage.merge_cache_hit,
        merge_ms=usage.merge_ms,
        transfer_ms=usage.transfer_ms,
        load_ms=usage.load_ms,
        rank=e.rank,
    )
