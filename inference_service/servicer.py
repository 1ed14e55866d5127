"""gRPC InferenceService: parse the request, call the data plane, map its steps to messages."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc.aio

from inference_service.chat import ChatTemplate
from inference_service.dataplane import DataPlane, Step, TokenLogprob
from inference_service.metrics import InferenceMetrics
from inference_service.recipes import RecipeBook
from inference_service.registry import AdapterRegistry, Usage
from inference_service.vllm_engine import Engine
from loramerge.errors import InvalidArgument, shown
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2
from loramerge_common.metrics import RpcMetrics
from loramerge_common.rpc import rpc_method

log = logging.getLogger(__name__)

_FINISH = {
    "stop": inference_pb2.FinishReason.STOP,
    "length": inference_pb2.FinishReason.LENGTH,
    "abort": inference_pb2.FinishReason.ABORT,
}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        registry: AdapterRegistry | None = None,
        engine: Engine | None = None,
        *,
        metrics: InferenceMetrics | None = None,
        rpc_metrics: RpcMetrics | None = None,
        fetch_timeout_ceiling_seconds: float = 1800.0,
        dataplane: DataPlane | None = None,
        recipes: RecipeBook | None = None,
    ) -> None:
        self.plane = dataplane or DataPlane(
            metrics=metrics, fetch_timeout_ceiling_seconds=fetch_timeout_ceiling_seconds, recipes=recipes
        )
        self.rpc_metrics = rpc_metrics
        if engine is not None and registry is not None:
            self.plane.attach(engine, registry)

    def attach(self, engine: Engine, registry: AdapterRegistry, chat: ChatTemplate | None = None) -> None:
        """The engine is ready: start serving (calls before this get UNAVAILABLE)."""
        self.plane.attach(engine, registry, chat)

    # -- RPCs --------------------------------------------------------------------------------

    @rpc_method
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        response = inference_pb2.GenerateResponse()
        texts: list[str] = []
        step: Step | None = None
        async for step in self.plane.generate(request, context.time_remaining()):
            if step.usage is not None:
                response.adapter.CopyFrom(adapter_usage(step.usage))
            texts.append(step.text)
            response.token_ids.extend(step.token_ids)
            response.logprobs.extend(logprob_messages(step.logprobs))
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
        steps = self.plane.generate(request, context.time_remaining(), merge_progress=request.merge_progress)
        async for step in steps:
            if step.merge_progress is not None:
                yield inference_pb2.GenerateStreamResponse(
                    request_id=step.request_id, merge_progress=step.merge_progress
                )
                continue
            msg = inference_pb2.GenerateStreamResponse(
                text=step.text,
                token_ids=step.token_ids,
                prompt_tokens=step.prompt_tokens,
                completion_tokens=step.completion_tokens,
                request_id=step.request_id,
                logprobs=logprob_messages(step.logprobs),
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
        registry, _ = self.plane.ready()
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
        registry, engine = self.plane.ready()
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
        registry, _ = self.plane.ready()
        if bool(request.merge_key) == bool(request.name):
            raise InvalidArgument(
                "set exactly one of merge_key and name, got "
                f"merge_key={shown(request.merge_key)} name={shown(request.name)}",
                field="merge_key",
            )
        return inference_pb2.UnloadAdapterResponse(
            unloaded=await registry.unload(merge_key=request.merge_key, name=request.name)
        )

    @rpc_method
    async def ListRecipes(
        self, request: inference_pb2.ListRecipesRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListRecipesResponse:
        return inference_pb2.ListRecipesResponse(
            recipes=[
                inference_pb2.Recipe(name=r.name, spec=r.spec, description=r.description)
                for r in self.plane.recipes
            ]
        )


def logprob_messages(logprobs: list[TokenLogprob]) -> list[inference_pb2.TokenLogprob]:
    return [
        inference_pb2.TokenLogprob(
            token_id=lp.token_id,
            text=lp.text,
            logprob=lp.logprob,
            top_logprobs=[
                inference_pb2.TopLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in lp.top
            ],
        )
        for lp in logprobs
    ]


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
