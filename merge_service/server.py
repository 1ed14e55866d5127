"""Wire the merge service together: sources, merger, cache, single-flight, builds, servicer, gRPC server."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from loramerge.stream import serialize_chunk
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.metrics import RpcMetrics
from loramerge_common.server import GrpcServer, Service
from merge_service.builds import BuildResult, Builds
from merge_service.cache import MergeCache
from merge_service.metrics import MergeMetrics
from merge_service.pipeline import Merger
from merge_service.servicer import MergeServicer
from merge_service.settings import MergeSettings
from merge_service.singleflight import SingleFlight
from merge_service.sources import SourceResolver
from merge_service.sources.s3 import S3Settings, S3Source

log = logging.getLogger(__name__)


class _Recorder:
    """Stands in for a server to catch the handlers the generated add function registers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def add_merge_service(servicer: merge_pb2_grpc.MergeServiceServicer, server: Any) -> None:
    """``add_MergeServiceServicer_to_server`` with ``serialize_chunk`` as Merge's serializer."""
    recorder = _Recorder()
    merge_pb2_grpc.add_MergeServiceServicer_to_server(servicer, recorder)
    handlers = recorder.handlers
    handlers["Merge"] = handlers["Merge"]._replace(response_serializer=serialize_chunk)
    name = merge_pb2.DESCRIPTOR.services_by_name["MergeService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


SERVICE_NAME = merge_pb2.DESCRIPTOR.services_by_name["MergeService"].full_name


def make_resolver(settings: MergeSettings) -> SourceResolver:
    """Local (under adapter_root), Hub (token from the variable hub_token_env names) and S3 sources."""
    max_bytes = settings.max_adapter_bytes or None
    resolver = SourceResolver(
        settings.adapter_root,
        hub_token=settings.hub_token(),
        hub_cache_dir=settings.hub_cache_dir,
        max_adapter_bytes=max_bytes,
    )
    s3 = S3Settings(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        cache_bytes=settings.s3_cache_bytes,
        addressing_style=settings.s3_addressing_style,
    )
    if settings.s3_cache_dir is not None:
        s3 = S3Settings(**{**s3.__dict__, "cache_dir": settings.s3_cache_dir})
    resolver.register(S3Source(s3, max_adapter_bytes=max_bytes))
    return resolver


def build_server(
    settings: MergeSettings, *, resolver: SourceResolver | None = None, merger: Merger | None = None
) -> tuple[GrpcServer, MergeServicer]:
    """A ready-to-start server (call on the event loop that will run it). ``resolver``/``merger``
    replace the ones built from settings (tests)."""
    settings.validate()
    registry = CollectorRegistry()
    rpc_metrics = RpcMetrics(registry)
    metrics = MergeMetrics(registry)
    merger = merger or Merger(
        resolver or make_resolver(settings),
        device=settings.device,
        max_input_bytes=settings.max_request_bytes or None,
    )
    cache = MergeCache(
        settings.cache_memory_bytes,
        disk_dir=settings.cache_dir,
        disk_bytes=settings.cache_disk_bytes,
        metrics=metrics,
    )
    flights: SingleFlight[BuildResult] = SingleFlight(
        settings.max_concurrent_builds, metrics, max_queued=settings.max_queued_builds
    )
    builds = Builds(merger, cache, flights, metrics, chunk_bytes=settings.chunk_bytes)
    servicer = MergeServicer(builds, max_adapters=settings.max_adapters, rpc_metrics=rpc_metrics)

    async def close_builds() -> None:
        await flights.close(timeout=0)

    server = GrpcServer(
        settings,
        [Service(SERVICE_NAME, servicer, add_merge_service)],
        registry=registry,
        rpc_metrics=rpc_metrics,
        on_stop=[close_builds],
    )
    return server, servicer
