"""Prometheus metrics of the merge service, on the server's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class MergeMetrics:
    """Builds, cache traffic and bytes streamed. RPC counts and errors by code are RpcMetrics'."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.merge_seconds = Histogram(
            "loramerge_merge_seconds",
            "Time to build one merged adapter (cache misses only)",
            ["strategy", "space"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.builds = Counter(
            "loramerge_merge_builds",
            "Merges computed (single-flight: one per key at a time)",
            registry=registry,
        )
        self.build_failures = Counter(
            "loramerge_merge_build_failures",
            "Merges that failed, by gRPC status code",
            ["code"],
            registry=registry,
        )
        self.builds_in_flight = Gauge(
            "loramerge_merge_builds_in_flight", "Merges being computed now", registry=registry
        )
        self.builds_waiting = Gauge(
            "loramerge_merge_builds_waiting", "Merges waiting for a build slot", registry=registry
        )
        self.cache_hits = Counter(
            "loramerge_merge_cache_hits", "Cache lookups answered, by tier", ["tier"], registry=registry
        )
        self.cache_misses = Counter(
            "loramerge_merge_cache_misses", "Cache lookups not answered, by tier", ["tier"], registry=registry
        )
        self.cache_corrupt = Counter(
            "loramerge_merge_cache_corrupt",
            "Disk cache entries dropped because their sha256 or metadata did not check out",
            registry=registry,
        )
        self.cache_evictions = Counter(
            "loramerge_merge_cache_evictions",
            "Entries evicted to stay within a bound, by tier",
            ["tier"],
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "loramerge_merge_cache_bytes", "Bytes held by the cache, by tier", ["tier"], registry=registry
        )
        self.bytes_streamed = Counter(
            "loramerge_merge_bytes_streamed", "Adapter bytes sent in Merge data chunks", registry=registry
        )
        self.singleflight_joins = Counter(
            "loramerge_merge_singleflight_joins",
            "Requests that joined a build already running for their key",
            registry=registry,
        )
