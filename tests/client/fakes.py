"""Scriptable stand-in servicers for testing client behaviour (retries, deadlines, metadata, errors).

Each servicer records the requests and metadata it saw. ``fail`` holds errors to raise on the
next calls, one per call (``None`` = answer normally), so a test says "UNAVAILABLE twice, then
work" with ``fake.fail = [UNAVAILABLE_ERR, UNAVAILABLE_ERR]``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio

from loramerge.errors import LoramergeError, Unavailable
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2, merge_pb2_grpc
from loramerge_common.rpc import rpc_method

WEIGHTS = bytes(range(256)) * 40  # 10 KiB "safetensors" payload
CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "tiny"})
SHA = hashlib.sha256(WEIGHTS).hexdigest()
CHUNK = 4096


@dataclass
class Seen:
    requests: list = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)

    def record(self, request: object, context: grpc.aio.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})


class Scripted:
    def __init__(self) -> None:
        self.seen = Seen()
        self.fail: list[LoramergeError | None] = []
        self.delay = 0.0
        self.rpc_metrics = None

    def reset(self) -> None:
        self.seen = Seen()
        self.fail = []
        self.delay = 0.0

    async def _enter(self, request: object, context: grpc.aio.ServicerContext) -> None:
        self.seen.record(request, context)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            err = self.fail.pop(0)
            if err is not None:
                raise err


class FakeMerge(Scripted, merge_pb2_grpc.MergeServiceServicer):
    """Merge streams progress, header, data (4 KiB chunks), trailer; ``break_after`` data chunks it
    fails with UNAVAILABLE once (a server going away mid-stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.break_after: int | None = None
        self.corrupt = False

    def reset(self) -> None:
        super().reset()
        self.break_after = None
        self.corrupt = False

    @rpc_method
    async def Plan(self, request: merge_pb2.MergeRequest, context: grpc.aio.ServicerContext):
        await self._enter(request, context)
        ids = [a.id for a in request.spec.adapters] or list(request.spec.ids)
        resolved = [
            merge_pb2.ResolvedAdapter(
                id=i, source=merge_pb2.LOCAL, digest="d" * 64, weight=1.0, rank=4, alpha=8, base_model="tiny"
            )
            for i in ids
        ]
        return merge_pb2.PlanResponse(
            merge_key="key-1",
            rank=4,
            cached=False,
            estimated_bytes=len(WEIGHTS),
            adapters=resolved,
            base_model="tiny",
            effective_spec=request.spec,
        )

    @rpc_method
    async def Merge(
        self, request: merge_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator:
        await self._enter(request, context)
        offset = request.resume_offset
        if offset == 0:
            for done in range(3):
                yield merge_pb2.MergeChunk(
                    progress=merge_pb2.MergeProgress(stage="merge", done=done, total=2)
                )
        yield merge_pb2.MergeChunk(
            header=merge_pb2.MergeHeader(
                merge_key="key-1",
                adapter_config_json=CONFIG,
                total_bytes=len(WEIGHTS),
                sha256=SHA,
                rank=4,
                offset=offset,
                file_name="adapter_model.safetensors",
            )
        )
        for sent, start in enumerate(range(offset, len(WEIGHTS), CHUNK)):
            if self.break_after is not None and sent == self.break_after:
                self.break_after = None
                raise Unavailable("merge service is restarting")
            piece = WEIGHTS[start : start + CHUNK]
            if self.corrupt:
                piece = bytes([piece[0] ^ 1]) + piece[1:]
            yield merge_pb2.MergeChunk(data=merge_pb2.DataChunk(offset=start, data=piece))
        yield merge_pb2.MergeChunk(trailer=merge_pb2.MergeTrailer(total_bytes=len(WEIGHTS), sha256=SHA))

    @rpc_method
    async def ListCached(self, request, context):
        await self._enter(request, context)
        return merge_pb2.ListCachedResponse(entries=[merge_pb2.CachedMerge(merge_key="key-1", bytes=10)])

    @rpc_method
    async def Evict(self, request: merge_pb2.EvictRequest, context):
        await self._enter(request, context)
        return merge_pb2.EvictResponse(evicted=5 if request.all else 1)


class FakeInference(Scripted, inference_pb2_grpc.InferenceServiceServicer):
    """Generate echoes the prompt; GenerateStream sends one message per word (``break_after`` words
    then UNAVAILABLE); LoadAdapter reassembles and checks the pushed chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.break_after: int | None = None
        self.loaded: list[tuple[merge_pb2.MergeHeader, bytes]] = []

    def reset(self) -> None:
        super().reset()
        self.break_after = None
        self.loaded = []

    @rpc_method
    async def Generate(self, request: inference_pb2.GenerateRequest, context):
        await self._enter(request, context)
        return inference_pb2.GenerateResponse(
            text=f"echo: {request.prompt}", finish_reason=inference_pb2.LENGTH, completion_tokens=3
        )

    @rpc_method
    async def GenerateStream(self, request: inference_pb2.GenerateRequest, context) -> AsyncIterator:
        await self._enter(request, context)
        words = request.prompt.split()
        for i, word in enumerate(words):
            if self.break_after is not None and i == self.break_after:
                self.break_after = None
                raise Unavailable("inference service went away")
            last = i == len(words) - 1
            yield inference_pb2.GenerateStreamResponse(
                text=word + ("" if last else " "),
                finish_reason=inference_pb2.STOP if last else inference_pb2.FINISH_REASON_UNSPECIFIED,
            )

    @rpc_method
    async def LoadAdapter(self, request_iterator, context):
        kinds: list[str] = []
        header = None
        data = bytearray()
        async for chunk in request_iterator:
            kind = chunk.WhichOneof("item")
            kinds.append(kind)
            if kind == "header":
                header = chunk.header
            elif kind == "data":
                data += chunk.data.data
        await self._enter(kinds, context)
        assert header is not None and hashlib.sha256(data).hexdigest() == header.sha256
        self.loaded.append((header, bytes(data)))
        return inference_pb2.LoadAdapterResponse(name="m-1", merge_key=header.merge_key or "pushed")

    @rpc_method
    async def ListAdapters(self, request, context):
        await self._enter(request, context)
        return inference_pb2.ListAdaptersResponse(
            adapters=[inference_pb2.LoadedAdapter(name="m-1", merge_key="key-1", rank=4)], max_lora_rank=16
        )

    @rpc_method
    async def UnloadAdapter(self, request: inference_pb2.UnloadAdapterRequest, context):
        await self._enter(request, context)
        return inference_pb2.UnloadAdapterResponse(unloaded=request.merge_key == "key-1")
