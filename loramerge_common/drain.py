"""Drain without errors: once a server starts shutting down, every new call is refused as retryable.

Why not just ``grpc.aio.Server.stop(grace)``: grpc core kills the calls it has accepted from the
transport but not yet handed to the application with RST_STREAM(CANCEL), so a call racing the
shutdown reaches the client as CANCELLED, which clients (ours included) do not retry. Instead,
from the moment health turns NOT_SERVING, ``DrainInterceptor`` answers every new call UNAVAILABLE
itself, and the server calls ``stop`` only once the calls it had already started are finished
(``DrainState.wait_idle``). What is left is a narrow race that the application cannot see: a call
reaching grpc core after its stop began is still dropped as CANCELLED (measured: about 1 call per
restart with four clients hammering one server); clients retry it (loramerge_client.retry).

``DrainState`` is also the hook for other front-ends of the same process (the inference service's
HTTP API): read ``state.draining`` and answer 503 with ``Retry-After: state.retry_after_seconds``;
wrap each request in ``with state.track():`` so that the drain waits for it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
import grpc.aio

from loramerge_common.auth import HEALTH_PREFIX, REFLECTION_PREFIXES
from loramerge_common.metrics import RpcMetrics
from loramerge_common.rpc import handler_like

DRAINING_MESSAGE = "the server is shutting down; retry (another replica or this one after restart)"


class DrainState:
    """Whether the process is draining, and how many calls (of every front-end) are in flight."""

    def __init__(self, retry_after_seconds: int = 1) -> None:
        self.retry_after_seconds = retry_after_seconds
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start_draining(self) -> None:
        self._draining = True

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one call in flight for its whole life (the drain waits for it)."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight or ``timeout`` seconds pass; True when idle."""
        if self._in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return self._in_flight == 0
        return True


def _wrap(handler: grpc.RpcMethodHandler, state: DrainState) -> grpc.RpcMethodHandler:
    """The same handler, counted in flight from its start to its last message."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with state.track():
                result = behaviour(request, context)
                if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                    try:
                        async for item in result:
                            yield item
                    finally:
                        # A cancelled call closes this generator: close the handler's now too, so its
                        # cleanup runs before the call counts as finished.
                        aclose = getattr(result, "aclose", None)
                        if aclose is not None:
                            await aclose()
                else:  # a handler that writes with context.write and returns a coroutine
                    await result

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make(stream, **kw)

    unary_behaviour = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with state.track():
            return await unary_behaviour(request, context)

    make = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(unary, **kw)


def _refuse(handler: grpc.RpcMethodHandler, retry_after_seconds: int) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        # retry-after in trailing metadata mirrors HTTP's Retry-After for clients that read it.
        context.set_trailing_metadata((("retry-after", str(retry_after_seconds)),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)

    return handler_like(handler, refuse)


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Refuses new calls with UNAVAILABLE while ``state.draining``; counts the others in flight.
    Health and reflection stay open (probes must read NOT_SERVING)."""

    def __init__(
        self,
        state: DrainState,
        *,
        exempt_prefixes: Iterable[str] = (HEALTH_PREFIX, *REFLECTION_PREFIXES),
        metrics: RpcMetrics | None = None,
    ) -> None:
        self.state = state
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
        if self.state.draining:
            if self._metrics:
                self._metrics.error(method.rsplit("/", 1)[-1], "UNAVAILABLE")
            return _refuse(handler, self.state.retry_after_seconds)
        return _wrap(handler, self.state)
