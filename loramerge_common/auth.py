"""Optional bearer-token authentication for gRPC servers.

Clients send metadata ``authorization: Bearer <token>``; the token is compared in constant time
(hmac.compare_digest). Health checks stay open so that probes need no secret, and so does
server reflection: it describes only the public contract in protos/, and grpcurl needs it before
it can send any call (with the token) at all. The token is read
from a file (mounted Kubernetes secret) or given directly; it is never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from loramerge_common.metrics import RpcMetrics

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def load_token(token: str | None = None, token_file: Path | None = None) -> str | None:
    """The configured token: the file's stripped content wins over ``token``; None means auth is off.
    Raises ValueError for an empty token (an empty secret would let everyone in)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"auth token file {token_file}: {e.strerror or e}") from None
        if not token:
            raise ValueError(f"auth token file {token_file} is empty")
    if token is not None and not token.strip():
        return None
    return token.strip() if token else None


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a client: ``stub.Method(req, metadata=bearer_metadata(token))``."""
    return (("authorization", f"Bearer {token}"),)


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(
        self,
        token: str,
        *,
        exempt_prefixes: Iterable[str] = (HEALTH_PREFIX, *REFLECTION_PREFIXES),
        metrics: RpcMetrics | None = None,
    ) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self._exempt = tuple(exempt_prefixes)
        self._metrics = metrics

    def _allowed(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                got = value if isinstance(value, bytes) else value.encode()
                if hmac.compare_digest(got, self._expected):
                    return True
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._exempt):
            return handler
        if self._allowed(handler_call_details.invocation_metadata):
            return handler
        if self._metrics:
            self._metrics.error(method.rsplit("/", 1)[-1], "UNAUTHENTICATED")
        return _deny_handler(
            handler, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
        )
