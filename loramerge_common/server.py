"""A grpc.aio server with the parts every loramerge service needs.

Health (grpc.health.v1, per service and overall), reflection (grpcurl needs no .proto files),
Prometheus metrics over HTTP, optional TLS / mutual TLS, optional bearer-token auth, message size
limits, and a graceful shutdown: on SIGTERM/SIGINT every health entry turns NOT_SERVING, new calls
are refused with UNAVAILABLE (never CANCELLED; see loramerge_common/drain.py) and calls in flight get
``grace_seconds`` to finish.

A service's ``__main__`` follows this pattern::

    def main(argv: list[str] | None = None) -> None:
        settings = load_settings(MySettings, "LORAMERGE_MINE_", sys.argv[1:] if argv is None else argv)
        setup_logging(settings.log_level, settings.log_format)
        asyncio.run(serve(settings))

    async def serve(settings: MySettings) -> None:
        registry = CollectorRegistry()
        rpc_metrics = RpcMetrics(registry)
        servicer = MyServicer(..., rpc_metrics=rpc_metrics)
        server = GrpcServer(
            settings,
            [Service(my_pb2.DESCRIPTOR.services_by_name["My"].full_name, servicer,
                     my_pb2_grpc.add_MyServicer_to_server)],
            registry=registry, rpc_metrics=rpc_metrics,
        )
        await run_server(server)          # returns after SIGTERM and the drain

Tests start a ``GrpcServer`` on "127.0.0.1:0" with ``await server.start()``, read ``server.port``
and ``server.metrics_port``, and ``await server.stop()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from loramerge_common.auth import BearerTokenInterceptor, load_token
from loramerge_common.drain import DrainInterceptor, DrainState
from loramerge_common.health import HEALTH_SERVICE_NAME, Health
from loramerge_common.metrics import MetricsEndpoint, RpcMetrics, start_metrics_server
from loramerge_common.settings import MiB, describe, setting
from loramerge_common.shutdown import install_stop_signals, remove_stop_signals
from loramerge_common.tls import server_credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Settings every loramerge gRPC server has. Subclass it to add a service's own settings and to
    change defaults (redeclare a field, e.g. ``listen: str = setting("0.0.0.0:50061", ...)``)."""

    listen: str = setting("0.0.0.0:50051", "host:port to serve gRPC on (port 0 picks a free port)")
    metrics_port: int = setting(0, "HTTP port for Prometheus /metrics; 0 turns it off")
    metrics_host: str = setting("0.0.0.0", "address the metrics HTTP server binds")
    grace_seconds: float = setting(30.0, "on SIGTERM, how long calls in flight may take to finish")
    drain_seconds: float = setting(
        0.0, "on SIGTERM, how long the port stays open (answering UNAVAILABLE) before the drain"
    )
    reuse_port: bool = setting(
        False,
        "share the listen ports with another process (SO_REUSEPORT): a replacement on the same host "
        "binds them while this one serves, for a rolling restart without a refused connection",
    )
    tls_cert: Path | None = setting(None, "PEM server certificate (with tls_key: serve TLS)")
    tls_key: Path | None = setting(None, "PEM private key of tls_cert")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle: require client certificates it signed (mTLS)")
    auth_token_file: Path | None = setting(None, "file holding the bearer token clients must send")
    auth_token: str | None = setting(
        None, "bearer token clients must send (auth_token_file wins)", secret=True
    )
    admin_token_file: Path | None = setting(
        None, "file holding the admin token (LoadAdapter, UnloadAdapter, Evict need it when auth is on)"
    )
    admin_token: str | None = setting(None, "admin token (admin_token_file wins)", secret=True)
    max_receive_message_bytes: int = setting(16 * MiB, "largest gRPC message accepted", byte_size=True)
    max_send_message_bytes: int = setting(16 * MiB, "largest gRPC message sent", byte_size=True)
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("json", "json (one object per line) or text")


@dataclass(frozen=True)
class Service:
    """A servicer, its full service name (for health and reflection) and the generated add function."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


StopHook = Callable[[], Awaitable[None]]


class GrpcServer:
    """Builds, starts and drains one grpc.aio server; see the module docstring for the pattern."""

    def __init__(
        self,
        settings: ServerSettings,
        services: Sequence[Service],
        *,
        registry: CollectorRegistry | None = None,
        rpc_metrics: RpcMetrics | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        serving_at_start: bool = True,
        on_stop: Sequence[StopHook] = (),
        drain: DrainState | None = None,
    ) -> None:
        self.settings = settings
        self.services = list(services)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rpc_metrics = rpc_metrics if rpc_metrics is not None else RpcMetrics(self.registry)
        self.health = Health(s.name for s in self.services)
        self.serving_at_start = serving_at_start
        self.on_stop = list(on_stop)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics: MetricsEndpoint | None = None
        self._stopped = False
        # Shared with other front-ends of the process (HTTP): they read ``drain.draining``.
        self.drain = drain if drain is not None else DrainState()

        token = load_token(settings.auth_token, settings.auth_token_file)
        all_interceptors = list(interceptors)
        admin_token = load_token(settings.admin_token, settings.admin_token_file)
        if admin_token and admin_token == token:
            raise ValueError("the admin token must differ from the user token")
        if token or admin_token:
            all_interceptors.insert(
                0, BearerTokenInterceptor(token, admin_token=admin_token, metrics=self.rpc_metrics)
            )
        # First in the chain: while draining, every call (even one with a bad token) is UNAVAILABLE.
        all_interceptors.insert(0, DrainInterceptor(self.drain, metrics=self.rpc_metrics))
        self.auth_enabled = bool(token or admin_token)
        self.credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        self.server = grpc.aio.server(
            interceptors=all_interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
                ("grpc.max_send_message_length", settings.max_send_message_bytes),
                # Off by default: a second server on a port in use must fail, not share it by accident.
                ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
                *options,
            ],
        )
        for s in self.services:
            s.add_to_server(s.servicer, self.server)
        self.health.add_to_server(self.server)
        reflection.enable_server_reflection(
            [*(s.name for s in self.services), HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )

    @property
    def address(self) -> str:
        """host:port clients dial (the bound port, 127.0.0.1 for a wildcard host)."""
        host = self.settings.listen.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self.credentials is None:
            self.port = self.server.add_insecure_port(self.settings.listen)
        else:
            self.port = self.server.add_secure_port(self.settings.listen, self.credentials)
        if not self.port:
            raise OSError(f"could not bind gRPC on {self.settings.listen}")
        await self.health.set_serving(self.serving_at_start)
        await self.server.start()
        if self.settings.metrics_port > 0:
            self._metrics = start_metrics_server(
                self.settings.metrics_port, self.registry, self.settings.metrics_host
            )
            self.metrics_port = self._metrics.port
        log.info(
            "server started",
            extra={
                "address": self.address,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "tls": self.credentials is not None,
                "mtls": self.settings.tls_client_ca is not None,
                "auth": self.auth_enabled,
                "services": [s.name for s in self.services],
            },
        )

    def start_metrics(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Expose /metrics even when settings turn it off (tests: ``port=0`` picks a free port)."""
        if self._metrics is None:
            self._metrics = start_metrics_server(port, self.registry, host)
            self.metrics_port = self._metrics.port
        return self._metrics.port

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls (UNAVAILABLE) and turn NOT_SERVING everywhere, wait drain_seconds, give the
        calls in flight ``grace`` seconds (default grace_seconds) to finish, then stop grpc (which
        cancels what is left) and run the on_stop hooks."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_seconds if grace is None else grace
        end = time.monotonic() + grace
        # Refuse before health flips: a client that sees NOT_SERVING must never get a call accepted.
        self.drain.start_draining()
        await self.health.drain()
        if self.settings.drain_seconds > 0:
            await asyncio.sleep(self.settings.drain_seconds)
        log.info("draining", extra={"grace_seconds": grace, "in_flight": self.drain.in_flight})
        # Only once our own calls are done is grpc stopped: grpc.stop cancels calls it holds that have
        # not reached a handler yet (CANCELLED at the client), so it must find none to hold.
        idle = await self.drain.wait_idle(end - time.monotonic())
        if not idle:
            log.warning("grace ran out", extra={"in_flight": self.drain.in_flight})
        await self.server.stop(max(0.0, end - time.monotonic()) if idle else 0)
        for hook in self.on_stop:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        log.info("server stopped")


async def run_server(
    server: GrpcServer, *, stop_event: asyncio.Event | None = None, handle_signals: bool = True
) -> None:
    """Start ``server``, serve until SIGTERM/SIGINT (or ``stop_event``), then drain and return."""
    stop_event = stop_event or asyncio.Event()
    installed = install_stop_signals(stop_event) if handle_signals else []
    try:
        await server.start()
        log.info("settings", extra={"settings": describe(server.settings)})
        await stop_event.wait()
    finally:
        await server.stop()
        remove_stop_signals(installed)
