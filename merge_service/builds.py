"""Merged adapters on demand: the cache first, else one shared build per merge key, then the bytes.

``Builds.obtain(plan)`` is what Merge does before it streams: a memory-cache hit is ready at once; a
miss joins (or starts) the single build for its key (``SingleFlight``), passing on its progress
events, and the build itself reads the disk tier before merging. A failed build caches nothing.
``Builds.slices`` then cuts the adapter's bytes into stream-sized pieces from a resume offset.

No protobuf here: the servicer converts requests into specs and these results into messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial

from loramerge.errors import InvalidArgument, LoramergeError
from merge_service import interference
from merge_service.cache import MergeCache
from merge_service.merged import MergedAdapter
from merge_service.metrics import MergeMetrics
from merge_service.pipeline import Merger, Plan
from merge_service.singleflight import Progress, ProgressFn, SingleFlight
from merge_service.spec import MergeSpec

log = logging.getLogger(__name__)

# What a build hands its waiters: the adapter, and whether it was merged now (False: read from disk).
BuildResult = tuple[MergedAdapter, bool]


@dataclass(frozen=True)
class Ready:
    """The end of ``Builds.obtain``: the merged adapter, and whether it came from the cache."""

    adapter: MergedAdapter
    cache_hit: bool


class Builds:
    def __init__(
        self,
        merger: Merger,
        cache: MergeCache,
        flights: SingleFlight[BuildResult],
        metrics: MergeMetrics,
        *,
        chunk_bytes: int,
    ) -> None:
        self.merger = merger
        self.cache = cache
        self.flights = flights
        self.metrics = metrics
        self.chunk_bytes = chunk_bytes

    async def plan(self, spec: MergeSpec) -> Plan:
        """``Merger.plan`` in a thread (it reads configs and headers)."""
        return await asyncio.to_thread(self.merger.plan, spec)

    async def interference(self, plan: Plan) -> interference.InterferenceResult:
        return await asyncio.to_thread(interference.plan_interference, plan)

    async def obtain(self, plan: Plan) -> AsyncIterator[Progress | Ready]:
        """Progress events of the build (none on a memory hit), then one ``Ready``."""
        adapter = self.cache.get_memory(plan.merge_key)
        if adapter is not None:
            yield Ready(adapter, True)
            return
        with self.flights.begin(plan.merge_key, partial(self._build, plan)) as ticket:
            async for event in ticket.events():
                yield event
            adapter, built = await ticket.result()
        yield Ready(adapter, not built)

    def slices(self, adapter: MergedAdapter, offset: int) -> Iterator[tuple[int, memoryview]]:
        """(start, bytes) pieces of ``chunk_bytes`` from ``offset``; InvalidArgument past the end."""
        total = adapter.nbytes
        if offset > total:  # refused here, before the caller sends anything
            raise InvalidArgument(
                f"resume_offset {offset} is past the end of the {total}-byte adapter", field="resume_offset"
            )
        return self._slices(memoryview(adapter.data), offset)

    def _slices(self, data: memoryview, offset: int) -> Iterator[tuple[int, memoryview]]:
        step = self.chunk_bytes
        for start in range(offset, len(data), step):
            piece = data[start : start + step]
            yield start, piece
            self.metrics.bytes_streamed.inc(len(piece))

    def _build(self, plan: Plan, progress: ProgressFn) -> BuildResult:
        """Runs in a build thread, once per key at a time: the disk tier first, else merge and cache."""
        cached = self.cache.get(plan.merge_key)
        if cached is not None:
            return cached, False
        try:
            built = self.merger.build(plan, progress)
        except LoramergeError as e:
            self.metrics.build_failures.labels(code=e.code.name).inc()
            raise
        except Exception:
            self.metrics.build_failures.labels(code="INTERNAL").inc()
            raise
        self.cache.put(built)
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
        return built, True
