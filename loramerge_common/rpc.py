"""Turn domain errors into gRPC statuses in servicer methods.

Decorate each servicer method with ``@rpc_method``; it works on coroutine methods (unary responses)
and async-generator methods (streaming responses)::

    class MergeServicer(merge_pb2_grpc.MergeServiceServicer):
        def __init__(self, ..., rpc_metrics: RpcMetrics | None = None):
            self.rpc_metrics = rpc_metrics          # optional; the decorator reads it

        @rpc_method
        async def Plan(self, request, context): ...  # raise InvalidArgument(..., field="spec.density")

- ``LoramergeError`` -> its status code, message and google.rpc.BadRequest details.
- any other exception -> INTERNAL with a short message; the traceback goes to the log.
- a client that cancels -> CancelledError (unary) or GeneratorExit (stream) propagates, counted as
  CANCELLED.
Each error is counted in ``loramerge_rpc_errors_total{method,code}`` when the servicer has metrics.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

from loramerge.errors import Internal, LoramergeError, to_rpc_status
from loramerge_common.metrics import RpcMetrics

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


async def abort_with_error(context: grpc.aio.ServicerContext, err: LoramergeError) -> NoReturn:
    """End the call with ``err``'s status and BadRequest details (raises, like context.abort)."""
    await context.abort_with_status(to_rpc_status(err))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


def _metrics(servicer: Any) -> RpcMetrics | None:
    return getattr(servicer, "rpc_metrics", None)


def _code_of(context: grpc.aio.ServicerContext) -> str | None:
    try:
        code = context.code()
    except Exception:  # older grpc: code() not available on aio contexts
        return None
    if code is None or code == grpc.StatusCode.OK:
        return None
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


async def _handle(
    exc: BaseException, method: str, servicer: Any, context: grpc.aio.ServicerContext
) -> NoReturn:
    metrics = _metrics(servicer)
    if isinstance(exc, asyncio.CancelledError):
        if metrics:
            metrics.error(method, "CANCELLED")
        raise exc
    if isinstance(exc, grpc.aio.AbortError):
        # The handler aborted by itself: the status is already set on the context.
        if metrics:
            metrics.error(method, _code_of(context) or "UNKNOWN")
        raise exc
    if isinstance(exc, LoramergeError):
        err = exc
        log.info(
            "rpc failed",
            extra={"method": method, "code": err.code.name, "error": err.message, "field": err.field},
        )
    else:
        log.error("unexpected error in %s", method, exc_info=exc)
        err = Internal(f"internal error in {method}: {type(exc).__name__}: {str(exc)[:200]}")
    if metrics:
        metrics.error(method, err.code.name)
    await abort_with_error(context, err)


def rpc_method(fn: F) -> F:
    """Map exceptions of a servicer method to gRPC statuses and record metrics (see module docstring)."""
    method = fn.__name__

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            metrics = _metrics(self)
            if metrics:
                metrics.requests.labels(method=method).inc()
            t0 = time.perf_counter()
            inner = fn(self, request, context)
            try:
                async for item in inner:
                    yield item
            except GeneratorExit:
                # grpc closes the generator of a stream the client cancelled (or the server dropped).
                if metrics:
                    metrics.error(method, "CANCELLED")
                raise
            except (Exception, asyncio.CancelledError) as exc:
                await _handle(exc, method, self, context)
            finally:
                await inner.aclose()  # run the handler's own cleanup now, not when it is collected
                if metrics:
                    metrics.seconds.labels(method=method).observe(time.perf_counter() - t0)

        return stream_wrapper  # type: ignore[return-value]

    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"rpc_method needs an async def or async generator, got {fn!r}")

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics = _metrics(self)
        if metrics:
            metrics.requests.labels(method=method).inc()
        t0 = time.perf_counter()
        try:
            return await fn(self, request, context)
        except (Exception, asyncio.CancelledError) as exc:
            await _handle(exc, method, self, context)
        finally:
            if metrics:
                metrics.seconds.labels(method=method).observe(time.perf_counter() - t0)

    return unary_wrapper  # type: ignore[return-value]


def handler_like(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A method handler of ``handler``'s kind (unary/streaming each way, same serializers) that runs
    ``behaviour`` instead: how interceptors answer a call without reaching the servicer."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kw)
    return grpc.unary_unary_rpc_method_handler(behaviour, **kw)
