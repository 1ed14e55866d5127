"""Prometheus metrics shared by both servers, and the HTTP endpoint that exposes them.

Each server owns a ``CollectorRegistry`` (not the process-wide default), so several servers in one
process (tests) keep separate counts. Services create their own metrics on that same registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram


class RpcMetrics:
    """Per-method call counts, latencies and errors by gRPC status code name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "loramerge_rpc_requests_total", "RPCs started, by method", ["method"], registry=registry
        )
        self.errors = Counter(
            "loramerge_rpc_errors_total",
            "RPCs that ended with an error, by method and gRPC status code",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "loramerge_rpc_seconds",
            "Wall time of RPC handlers (streams: until the last message is sent)",
            ["method"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )

    def error(self, method: str, code: str) -> None:
        self.errors.labels(method=method, code=code).inc()


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server; ``port`` is the bound port (useful when asked for 0)."""

    server: WSGIServer
    thread: Thread
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> MetricsEndpoint:
    """Serve ``registry`` over HTTP on ``host:port`` in a daemon thread (port 0 picks a free port)."""
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server=server, thread=thread, port=server.server_port)


def sample_value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample (0.0 when it has not been recorded yet)."""
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
