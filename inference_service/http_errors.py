"""Domain errors -> HTTP answers in each API's own error shape (OpenAI's and LoRAX's)."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from loramerge.errors import LoramergeError

RETRY_AFTER_SECONDS = "1"

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
# LoRAX answers validation faults with 422 and overload with 429; its client picks the exception
# class from error_type first, the status second.
_LORAX = {
    400: (422, "validation"),
    404: (422, "validation"),
    413: (413, "validation"),
    429: (429, "overloaded"),
    503: (503, "overloaded"),
    504: (504, "generation"),
}


class HttpError(Exception):
    """A fault found by the HTTP layer itself (bad JSON, body too large, bad token)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def http_status(err: LoramergeError) -> int:
    return _HTTP_STATUS.get(err.code, 500)


def _headers(status: int) -> dict[str, str] | None:
    return {"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None


def openai_body(status: int, message: str, param: str | None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPE.get(status, "internal_error"),
            "param": param,
            "code": status,
        }
    }


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(openai_body(status, message, param), status_code=status, headers=_headers(status))


def lorax_body(status: int, message: str) -> tuple[int, dict]:
    code, kind = _LORAX.get(status, (status if status < 500 else 500, "generation"))
    if status == 401:
        code, kind = 401, "validation"
    return code, {"error": message, "error_type": kind}


def lorax_error(status: int, message: str) -> JSONResponse:
    code, body = lorax_body(status, message)
    return JSONResponse(body, status_code=code, headers=_headers(code))
