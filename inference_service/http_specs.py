"""JSON merge specs as the HTTP APIs send them -> MergeSpec (LoRAX's lower-case enum names accepted)."""

from __future__ import annotations

from google.protobuf import json_format

from inference_service.http_errors import HttpError
from loramerge.errors import shown
from loramerge.v1 import merge_pb2

_ENUM_FIELDS = ("merge_strategy", "majority_sign_method", "space", "dtype")


def merge_spec_from_json(body: object, param: str = "merged_adapters") -> merge_pb2.MergeSpec:
    """A MergeSpec from its protobuf JSON; enum values may be written lower-case as LoRAX does."""
    if not isinstance(body, dict):
        raise HttpError(400, f"{param} must be an object of MergeSpec fields, got {shown(body)}", param)
    body = dict(body)
    for name in _ENUM_FIELDS:
        if isinstance(body.get(name), str):
            body[name] = body[name].upper()
    spec = merge_pb2.MergeSpec()
    try:
        json_format.ParseDict(body, spec)
    except json_format.ParseError as e:
        raise HttpError(400, f"{param}: {shown(str(e), 200, quote=False)}", param) from None
    return spec
