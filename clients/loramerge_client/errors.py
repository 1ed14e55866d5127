"""Failed calls become the same exception classes the services raise.

A server aborts with ``loramerge.errors.to_rpc_status(err)``: a status code, a message and
google.rpc.BadRequest field violations in the ``grpc-status-details-bin`` trailer. The client turns
any failed call back into a ``LoramergeError`` subclass (``InvalidArgument``, ``NotFound``, ...)
carrying ``.code`` (a ``grpc.StatusCode``), ``.message`` and ``.violations``, so callers catch one
base type and branch on ``.code`` or on the class.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from loramerge.errors import DataLoss, LoramergeError, error_class_for, violations_from_status

_DETAILS_KEY = "grpc-status-details-bin"

# Codes that mean "the request is wrong" (fix the input), as opposed to "try again later".
BAD_INPUT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a server attached to a failed call, if any."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == _DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer must not hide the original error
                return None
    return None


def from_rpc_error(err: grpc.RpcError) -> LoramergeError:
    """The ``LoramergeError`` for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    code = code or grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or code.name
    exc = error_class_for(code)(message, violations=violations_from_status(rich_status(err)))
    exc.code = code  # also right for codes without a class of their own (UNKNOWN, CANCELLED, ...)
    return exc


def make_error(code: grpc.StatusCode, message: str, *, field: str | None = None) -> LoramergeError:
    """A client-side error of the class a server would have used for ``code``."""
    exc = error_class_for(code)(message, field=field)
    exc.code = code
    return exc


def exit_code_for(err: BaseException) -> int:
    """The ``loramerge`` command's exit status for an error: 2 bad input, 3 unavailable, 1 other."""
    if isinstance(err, LoramergeError):
        if err.code in BAD_INPUT_CODES:
            return 2
        if err.code in UNAVAILABLE_CODES:
            return 3
    return 1


__all__ = [
    "BAD_INPUT_CODES",
    "UNAVAILABLE_CODES",
    "DataLoss",
    "LoramergeError",
    "exit_code_for",
    "from_rpc_error",
    "make_error",
    "rich_status",
]
