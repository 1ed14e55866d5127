"""Reading an HTTP request's JSON body within a size limit (the gRPC front-end's receive limit)."""

from __future__ import annotations

import json

from fastapi import Request

from inference_service.http_errors import HttpError


async def read_json(request: Request, limit: int) -> object:
    """The request body as JSON, refusing bodies above ``limit`` bytes before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body of {declared} bytes is above the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body is above the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError(400, f"request body is not valid JSON: {e}") from None
