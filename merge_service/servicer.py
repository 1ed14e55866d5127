"""The MergeService gRPC servicer: requests into specs, ``Builds`` results into messages.

Merge streams ``progress* -> header -> data* -> trailer`` (what to stream, and from where, is
``builds.py``'s). Domain errors become statuses through ``rpc_method``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc.aio

from loramerge.errors import FailedPrecondition, InvalidArgument, shown
from loramerge.peft import WEIGHTS_FILE
from loramerge.stream import encode_data_chunk
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.metrics import RpcMetrics
from loramerge_common.rpc import rpc_method
from merge_service import interference
from merge_service.builds import Builds, Ready
from merge_service.cache import check_key
from merge_service.convert import module_stats, resolved_adapter, spec_from_proto, spec_to_proto
from merge_service.pipeline import Plan

log = logging.getLogger(__name__)


class MergeServicer(merge_pb2_grpc.MergeServiceServicer):
    def __init__(
        self, builds: Builds, *, max_adapters: int = 0, rpc_metrics: RpcMetrics | None = None
    ) -> None:
        self.builds = builds
        self.merger = builds.merger
        self.cache = builds.cache
        self.max_adapters = max_adapters
        self.rpc_metrics = rpc_metrics

    async def _plan(self, request: merge_pb2.MergeRequest) -> Plan:
        return await self.builds.plan(spec_from_proto(request.spec, max_adapters=self.max_adapters))

    @rpc_method
    async def Merge(
        self, request: merge_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[merge_pb2.MergeChunk | bytes]:
        t0 = time.perf_counter()
        plan = await self._plan(request)
        key = plan.merge_key
        if request.expected_merge_key and request.expected_merge_key != key:
            raise FailedPrecondition(
                f"expected_merge_key is {shown(request.expected_merge_key)} but this request merges "
                f"to {shown(key)}: "
                "the adapters or parameters changed since the first attempt; restart from offset 0",
                field="expected_merge_key",
            )
        async for event in self.builds.obtain(plan):
            if isinstance(event, Ready):
                ready = event
            else:
                yield merge_pb2.MergeChunk(
                    progress=merge_pb2.MergeProgress(stage=event.stage, done=event.done, total=event.total)
                )
        adapter, offset = ready.adapter, request.resume_offset
        pieces = self.builds.slices(adapter, offset)
        yield merge_pb2.MergeChunk(
            header=merge_pb2.MergeHeader(
                merge_key=key,
                adapter_config_json=adapter.config_json,
                total_bytes=adapter.nbytes,
                sha256=adapter.sha256,
                rank=adapter.rank,
                modules=module_stats(adapter.modules),
                cache_hit=ready.cache_hit,
                build_seconds=adapter.build_seconds,
                base_model=adapter.base_model,
                offset=offset,
                file_name=WEIGHTS_FILE,
            )
        )
        for start, piece in pieces:
            # Pre-encoded MergeChunk bytes (loramerge/stream.py): one copy of the payload, not three.
            yield encode_data_chunk(start, piece)
        yield merge_pb2.MergeChunk(
            trailer=merge_pb2.MergeTrailer(total_bytes=adapter.nbytes, sha256=adapter.sha256)
        )
        log.info(
            "merge streamed",
            extra={
                "merge_key": key,
                "cache_hit": ready.cache_hit,
                "bytes": adapter.nbytes - offset,
                "offset": offset,
                "seconds": round(time.perf_counter() - t0, 4),
            },
        )

    @rpc_method
    async def Plan(
        self, request: merge_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> merge_pb2.PlanResponse:
        plan = await self._plan(request)
        report = None
        if request.interference:
            report = interference.to_proto(await self.builds.interference(plan))
        cached = self.cache.contains(plan.merge_key)
        return merge_pb2.PlanResponse(
            merge_key=plan.merge_key,
            rank=plan.rank,
            estimated_bytes=plan.estimated_bytes,
            cached=cached,
            adapters=[
                resolved_adapter(src, ref.weight, cfg)  # the configs as planned: no second read of the files
                for src, ref, cfg in zip(plan.sources, plan.spec.adapters, plan.configs, strict=True)
            ],
            base_model=plan.base_model,
            effective_spec=spec_to_proto(plan.spec),
            interference=report,
            estimated_build_seconds=0.0 if cached else self.merger.estimate_seconds(plan),
        )

    @rpc_method
    async def ListCached(
        self, request: merge_pb2.ListCachedRequest, context: grpc.aio.ServicerContext
    ) -> merge_pb2.ListCachedResponse:
        entries = await asyncio.to_thread(self.cache.entries)
        disk_bytes, disk_limit = await asyncio.to_thread(self.cache.disk_usage)
        return merge_pb2.ListCachedResponse(
            entries=[
                merge_pb2.CachedMerge(
                    merge_key=e.merge_key,
                    bytes=e.bytes,
                    in_memory=e.in_memory,
                    on_disk=e.on_disk,
                    rank=e.rank,
                    base_model=e.base_model,
                    hits=e.hits,
                )
                for e in entries
            ],
            memory_bytes=self.cache.memory_bytes,
            memory_limit_bytes=self.cache.memory_limit_bytes,
            disk_bytes=disk_bytes,
            disk_limit_bytes=disk_limit,
        )

    @rpc_method
    async def Evict(
        self, request: merge_pb2.EvictRequest, context: grpc.aio.ServicerContext
    ) -> merge_pb2.EvictResponse:
        if request.all:
            if request.merge_key:
                raise InvalidArgument(
                    f"merge_key must be empty when all is set, got {shown(request.merge_key)}",
                    field="merge_key",
                )
            evicted = await asyncio.to_thread(self.cache.evict_all)
        else:
            if not request.merge_key:
                raise InvalidArgument(
                    "merge_key is required (or set all to evict everything)", field="merge_key"
                )
            evicted = await asyncio.to_thread(self.cache.evict, check_key(request.merge_key))
        log.info("evicted", extra={"merge_key": request.merge_key or "*", "evicted": evicted})
        return merge_pb2.EvictResponse(evicted=evicted)
