"""Optional bearer-token authentication for gRPC servers.

Clients send metadata ``authorization: Bearer <token>``; the token is compared in constant time
(hmac.compare_digest). Health checks stay open so that probes need no secret, and so does
server reflection: it describes only the public contract in protos/, and grpcurl needs it before
it can send any call (with the token) at all. The token is read
from a file (mounted Kubernetes secret) or given directly; it is never logged.

Roles: the admin operations (``ADMIN_METHODS``: pushing an adapter, unloading one, evicting the
merge cache) need the admin token when one is configured; with user tokens configured and no admin
token nobody may call them (PERMISSION_DENIED); with no token at all (local use) everything is open.
The admin token also passes every ordinary call. ``TokenAuth.check`` is the one decision, shared
by the gRPC interceptor and the HTTP front-ends (which pass the Authorization header).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from loramerge_common.metrics import RpcMetrics
from loramerge_common.rpc import handler_like

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


# Full gRPC method names of the admin operations (HTTP front-ends map their twins onto these).
ADMIN_METHODS = frozenset(
    {
        "/loramerge.v1.InferenceService/LoadAdapter",
        "/loramerge.v1.InferenceService/UnloadAdapter",
        "/loramerge.v1.MergeService/Evict",
    }
)
MISSING_TOKEN = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
NEEDS_ADMIN = "this call needs the admin token"
NO_ADMIN = "this call needs the admin token, and this server has none configured (--admin-token-file)"


def _same(got: str | bytes, expected: bytes | None) -> bool:
    if expected is None:
        return False
    return hmac.compare_digest(got if isinstance(got, bytes) else got.encode(), expected)


@dataclass(frozen=True)
class Denial:
    """Why a call is refused: UNAUTHENTICATED (HTTP 401) or PERMISSION_DENIED (HTTP 403)."""

    code: grpc.StatusCode
    message: str

    @property
    def http_status(self) -> int:
        return 403 if self.code == grpc.StatusCode.PERMISSION_DENIED else 401


class TokenAuth:
    """The user and admin tokens of one server and the role decision (see the module docstring)."""

    def __init__(self, user_token: str | None, admin_token: str | None = None) -> None:
        self._user = f"Bearer {user_token}".encode() if user_token else None
        self._admin = f"Bearer {admin_token}".encode() if admin_token else None

    @property
    def enabled(self) -> bool:
        return self._user is not None or self._admin is not None

    def check(self, authorization: str | bytes | None, *, admin: bool) -> Denial | None:
        """None when a call with this ``authorization`` value ("Bearer <token>") may go on."""
        if not self.enabled:
            return None
        got = authorization or b""
        if _same(got, self._admin):
            return None
        if admin:
            # Authenticate first: a caller without a valid token learns nothing about roles.
            if _same(got, self._user):
                return Denial(grpc.StatusCode.PERMISSION_DENIED, NEEDS_ADMIN if self._admin else NO_ADMIN)
            return Denial(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        # Only an admin token configured: ordinary calls stay open, admin calls are gated.
        if self._user is None or _same(got, self._user):
            return None
        return Denial(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)

    def check_method(self, method: str, authorization: str | bytes | None) -> Denial | None:
        """``check`` for a full gRPC method name (admin when it is in ADMIN_METHODS)."""
        return self.check(authorization, admin=method in ADMIN_METHODS)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a client: ``stub.Method(req, metadata=bearer_metadata(token))``."""
    return (("authorization", f"Bearer {token}"),)


def _deny_handler(
    handler: grpc.RpcMethodHandler, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return handler_like(handler, deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right ``authorization: Bearer <token>`` with UNAUTHENTICATED, and
    admin calls without the admin token with PERMISSION_DENIED (see ``TokenAuth``)."""

    def __init__(
        self,
        token: str | None,
        *,
        admin_token: str | None = None,
        exempt_prefixes: Iterable[str] = (HEALTH_PREFIX, *REFLECTION_PREFIXES),
        metrics: RpcMetrics | None = None,
    ) -> None:
        if not token and not admin_token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self.auth = TokenAuth(token, admin_token)
        self._exempt = tuple(exempt_prefixes)
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._exempt):
            return handler
        authorization = next(
            (v for k, v in handler_call_details.invocation_metadata or () if k.lower() == "authorization"),
            None,
        )
        denial = self.auth.check_method(method, authorization)
        if denial is None:
            return handler
        if self._metrics:
            self._metrics.error(method.rsplit("/", 1)[-1], denial.code.name)
        return _deny_handler(handler, denial.message, denial.code)
