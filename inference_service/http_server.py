"""The HTTP front-end of the inference service: OpenAI- and LoRAX-compatible routes on one data plane.

It runs in the service's own event loop (uvicorn) beside the gRPC server and shares with it the
engine and registry (through ``DataPlane``), TLS files, bearer token, request size limit,
Prometheus registry and drain: once health is NOT_SERVING every new call gets 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram

from inference_service.dataplane import DataPlane
from inference_service.http_errors import HttpError, lorax_error, openai_error
from inference_service.lorax_api import lorax_router
from inference_service.openai_api import openai_router
from loramerge.errors import LoramergeError
from loramerge_common.auth import Denial, TokenAuth

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/live", "/ready"})


@dataclass
class HttpOptions:
    listen: str
    max_body_bytes: int
    auth: TokenAuth | None = None  # the gRPC server's user and admin tokens
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    grace_seconds: float = 10.0
    reuse_port: bool = False  # SO_REUSEPORT, like the gRPC port (settings.reuse_port)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "loramerge_http_requests",
            "HTTP requests by API route and status code",
            ["route", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "loramerge_http_request_seconds",
            "HTTP request handling time (to the end of the body, streams included)",
            ["route"],
            registry=registry,
        )


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def api_error(path: str, status: int, message: str, param: str | None = None) -> JSONResponse:
    """The error in the shape of the API that ``path`` belongs to."""
    return openai_error(status, message, param) if is_openai(path) else lorax_error(status, message)


class HttpFrontEnd:
    """FastAPI app + uvicorn server; ``serving`` says whether health is SERVING (else drain)."""

    def __init__(
        self,
        plane: DataPlane,
        options: HttpOptions,
        serving: Callable[[], bool],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.plane = plane
        self.options = options
        self.serving = serving
        self.metrics = HttpMetrics(registry)
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        app = FastAPI(title="loramerge inference", docs_url=None, redoc_url=None, openapi_url=None)
        app.middleware("http")(self._gate)
        app.add_api_route("/live", self._live, methods=["GET"])
        app.add_api_route("/health", self._ready, methods=["GET"])
        app.add_api_route("/ready", self._ready, methods=["GET"])
        app.include_router(openai_router(plane, options.max_body_bytes))
        app.include_router(lorax_router(plane, options.max_body_bytes))
        app.add_exception_handler(HttpError, self._http_error)
        app.add_exception_handler(LoramergeError, self._domain_error)
        self.app = app

    async def _gate(self, request: Request, call_next) -> Response:
        """Drain, authentication and metrics, in front of every route."""
        path = request.url.path
        route = (
            path
            if path in OPEN_PATHS or is_openai(path) or path in ("/", "/generate", "/generate_stream")
            else "other"
        )
        t0 = time.perf_counter()
        if path in OPEN_PATHS:
            response = await call_next(request)
        elif not self.serving():
            response = api_error(
                path, 503, "the inference service is not serving (starting or draining); retry"
            )
            # Close the connection: a client's retry on a kept-alive one would reach this process
            # again; a new connection can reach a replica that serves (or the replacement sharing
            # the port). Clients retry 503 with Retry-After (the OpenAI SDK does, twice, by default).
            response.headers["Connection"] = "close"
        elif denial := self._denied(request):
            response = api_error(
                path, denial.http_status, f"{denial.message} (header 'Authorization: Bearer …')"
            )
        else:
            response = await call_next(request)
        self.metrics.requests.labels(route=route, code=str(response.status_code)).inc()
        self.metrics.seconds.labels(route=route).observe(time.perf_counter() - t0)
        return response

    def _denied(self, request: Request) -> Denial | None:
        # No HTTP route is an admin operation (pushing, unloading and evicting are gRPC-only).
        auth = self.options.auth
        return auth.check(request.headers.get("authorization"), admin=False) if auth else None

    async def _live(self) -> dict:
        return {"status": "alive"}

    async def _ready(self) -> Response:
        if self.serving():
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": "not serving"}, status_code=503, headers={"Retry-After": "1"})

    async def _http_error(self, request: Request, exc: HttpError) -> Response:
        return api_error(request.url.path, exc.status, exc.message, exc.param)

    async def _domain_error(self, request: Request, exc: LoramergeError) -> Response:
        from inference_service.http_errors import http_status

        return api_error(request.url.path, http_status(exc), exc.message, exc.field)

    async def start(self) -> None:
        host, _, port = self.options.listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.options.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(512)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        ssl = {}
        if self.options.tls_cert:
            import ssl as ssl_module

            ssl = {"ssl_certfile": self.options.tls_cert, "ssl_keyfile": self.options.tls_key}
            if self.options.tls_client_ca:
                ssl.update(ssl_ca_certs=self.options.tls_client_ca, ssl_cert_reqs=ssl_module.CERT_REQUIRED)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(max(1, self.options.grace_seconds)),
            **ssl,
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the service owns SIGTERM
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        log.info("HTTP front-end listening", extra={"address": f"{host}:{self.port}"})

    async def stop(self) -> None:
        """Finish the requests in flight (up to the grace period), then close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.warning("HTTP front-end stopped with an error", exc_info=True)
