"""Domain errors shared by both services and the clients.

Domain code raises these; servicers turn them into a gRPC status with
google.rpc.BadRequest details (``to_rpc_status``), and clients turn a failed
call back into one (``LoramergeError.from_rpc_error`` lives in the client).
Every message names the field and the offending value, so a user reading a
grpcurl error line knows what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

SHOWN_CHARS = 120  # longest quotation of a value in a message


def shown(value: object, limit: int = SHOWN_CHARS, *, quote: bool = True) -> str:
    """``repr(value)`` (``str`` with ``quote=False``) for a message, cut to ``limit`` characters.

    Requests may carry values far longer than any message should be (an adapter id of a megabyte);
    a message that quoted them whole would echo the request back, escaped up to tenfold. The cut
    keeps the start and says how long the value was: ``'aaaa…(5000 chars)'``.
    """
    text = repr(value) if quote or not isinstance(value, str) else value
    if len(text) <= limit:
        return text
    if isinstance(value, str | bytes | bytearray):
        size = f"{len(value)} {'chars' if isinstance(value, str) else 'bytes'}"
    else:
        size = f"{len(text)} chars"
    return f"{text[:limit]}…({size})"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class LoramergeError(Exception):
    """Base class. ``field`` names the request field at fault, when there is one."""

    code = grpc.StatusCode.INTERNAL

    def __init__(
        self, message: str, *, field: str | None = None, violations: list[FieldViolation] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.violations = list(violations or ([FieldViolation(field, message)] if field else []))

    def __str__(self) -> str:
        return self.message


class InvalidArgument(LoramergeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoramergeError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(LoramergeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LoramergeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(LoramergeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LoramergeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(LoramergeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LoramergeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(LoramergeError):
    """Retryable: the call saw its inputs change under it and did nothing (e.g. plan → build race)."""

    code = grpc.StatusCode.ABORTED


class Internal(LoramergeError):
    code = grpc.StatusCode.INTERNAL


class DataLoss(LoramergeError):
    """A merged adapter arrived with the wrong size or sha256 (nothing was written or loaded)."""

    code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[LoramergeError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        Aborted,
        Internal,
        DataLoss,
    )
}


def error_class_for(code: grpc.StatusCode) -> type[LoramergeError]:
    return _BY_CODE.get(code, LoramergeError)


def to_rpc_status(err: LoramergeError) -> grpc.Status:
    """A grpc.Status carrying google.rpc.Status with BadRequest field violations."""
    st = status_pb2.Status(code=getattr(code_pb2, err.code.name), message=err.message)
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in err.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        st.details.append(detail)
    return rpc_status.to_status(st)


def violations_from_status(st: status_pb2.Status | None) -> list[FieldViolation]:
    """Field violations carried in a google.rpc.Status (empty when there are none)."""
    out: list[FieldViolation] = []
    if st is None:
        return out
    for detail in st.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return out
