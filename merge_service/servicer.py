"""The MergeService gRPC servicer: parse, validate, call the merge domain, stream the result.

Merge streams ``progress* -> header -> data* -> trailer``. A cache hit streams at once; a miss joins
(or starts) the single build for its merge key, passing on its progress events. Domain errors become
statuses through ``rpc_method``; a failed build caches nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from functools import partial

import grpc.aio

from loramerge.errors import FailedPrecondition, InvalidArgument, LoramergeError, shown
from loramerge.peft import WEIGHTS_FILE
from loramerge.stream import encode_data_chunk
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.metrics import RpcMetrics
from loramerge_common.rpc import rpc_method
from merge_service import interference
from merge_service.cache import CacheEntry, MergeCache, check_key
from merge_service.convert import module_stats, resolved_adapter, spec_from_proto, spec_to_proto
from merge_service.metrics import MergeMetrics
from merge_service.pipeline import Merger, Plan
from merge_service.singleflight import ProgressFn, SingleFlight

log = logging.getLogger(__name__)

# What a build hands its waiters: the entry, and whether it was merged now (False: read from disk).
BuildResult = tuple[CacheEntry, bool]


class MergeServicer(merge_pb2_grpc.MergeServiceServicer):
    def __init__(
        self,
        merger: Merger,
        cache: MergeCache,
        flights: SingleFlight[BuildResult],
        metrics: MergeMetrics,
        *,
        chunk_bytes: int,
        max_adapters: int = 0,
        rpc_metrics: RpcMetrics | None = None,
    ) -> None:
        self.merger = merger
        self.cache = cache
        self.flights = flights
        self.metrics = metrics
        self.chunk_bytes = chunk_bytes
        self.max_adapters = max_adapters
        self.rpc_metrics = rpc_metrics

    async def _plan(self, request: merge_pb2.MergeRequest) -> Plan:
        spec = spec_from_proto(request.spec, max_adapters=self.max_adapters)
        return await asyncio.to_thread(self.merger.plan, spec)

    def _build(self, plan: Plan, progress: ProgressFn) -> BuildResult:
        """Runs in a build thread, once per key at a time: the disk tier first, else merge and cache."""
        entry = self.cache.get(plan.merge_key)
        if entry is not None:
            return entry, False
        try:
            built = self.merger.build(plan, progress)
        except LoramergeError as e:
            self.metrics.build_failures.labels(code=e.code.name).inc()
            raise
        except Exception:
            self.metrics.build_failures.labels(code="INTERNAL").inc()
            raise
        entry = CacheEntry.from_built(built)
        self.cache.put(entry)
        self.metrics.builds.inc()
        self.metrics.merge_seconds.labels(
            strategy=str(plan.spec.strategy), space=str(plan.spec.space)
        ).observe(built.build_seconds)
        log.info(
            "merge built",
            extra={
                "merge_key": plan.merge_key,
                "strategy": str(plan.spec.strategy),
                "space": str(plan.spec.space),
                "adapters": len(plan.sources),
                "rank": built.rank,
                "bytes": len(built.data),
                "build_seconds": round(built.build_seconds, 4),
            },
        )
        return entry, True

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
        entry = self.cache.get_memory(key)
        cache_hit = entry is not None
        if entry is None:
            with self.flights.begin(key, partial(self._build, plan)) as ticket:
                async for event in ticket.events():
                    yield merge_pb2.MergeChunk(
                        progress=merge_pb2.MergeProgress(
                            stage=event.stage, done=event.done, total=event.total
                        )
                    )
                entry, built = await ticket.result()
            cache_hit = not built

        total = entry.nbytes
        offset = request.resume_offset
        if offset > total:
            raise InvalidArgument(
                f"resume_offset {offset} is past the end of the {total}-byte adapter", field="resume_offset"
            )
        yield merge_pb2.MergeChunk(
            header=merge_pb2.MergeHeader(
                merge_key=key,
                adapter_config_json=entry.config_json,
                total_bytes=total,
                sha256=entry.sha256,
                rank=entry.rank,
                modules=module_stats(entry.modules),
                cache_hit=cache_hit,
                build_seconds=entry.build_seconds,
                base_model=entry.base_model,
                offset=offset,
                file_name=WEIGHTS_FILE,
            )
        )
        data = memoryview(entry.data)
        step = self.chunk_bytes
        for start in range(offset, total, step):
            piece = data[start : start + step]
            # Pre-encoded MergeChunk bytes (see chunks.py): one copy of the payload instead of three.
            yield encode_data_chunk(start, piece)
            self.metrics.bytes_streamed.inc(len(piece))
        yield merge_pb2.MergeChunk(trailer=merge_pb2.MergeTrailer(total_bytes=total, sha256=entry.sha256))
        log.info(
            "merge streamed",
            extra={
                "merge_key": key,
                "cache_hit": cache_hit,
                "bytes": total - offset,
                "offset": offset,
                "seconds": round(time.perf_counter() - t0, 4),
            },
        )

    @rpc_method
    async def Plan(
        self, request: merge_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> merge_pb2.PlanResponse:
        plan = await self._plan(request)
        configs = plan.configs  # as planned: no second read of the files
        report = None
        if request.interference:
            report = interference.to_proto(await asyncio.to_thread(interference.plan_interference, plan))
        cached = self.cache.contains(plan.merge_key)
        return merge_pb2.PlanResponse(
            merge_key=plan.merge_key,
            rank=plan.rank,
            estimated_bytes=plan.estimated_bytes,
            cached=cached,
            adapters=[
                resolved_adapter(src, ref.weight, cfg)
                for src, ref, cfg in zip(plan.sources, plan.spec.adapters, configs, strict=True)
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
