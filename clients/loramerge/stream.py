"""The Merge stream's wire codec: data chunks encoded straight from the cached bytes, and decoded as views.

A ``MergeChunk{data: DataChunk{offset, data}}`` message is a few bytes of framing followed by the
payload, so it is built with one copy of the payload (``bytes.join`` over a memoryview) instead of
the three that slicing, message construction and ``SerializeToString`` take; at hundreds of
megabytes per adapter that is most of the server's CPU time. The output is byte-identical to
protobuf's own serialization (tests compare them). ``serialize_chunk`` is the Merge method's
response serializer: pre-encoded ``bytes`` pass through, messages are serialized as usual.

Receivers do the reverse with ``merge_method``: a Merge call whose data chunks arrive as
``DataView`` (the payload is a view into the received message, not a copy), while progress, header
and trailer are parsed by protobuf as usual. Parsing a 1 MiB data chunk with protobuf and reading
``chunk.data.data`` copies the payload twice more on a path that already copies it in gRPC itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from loramerge.v1 import merge_pb2

CHUNK_BYTES = 1 << 20  # data payload per message
MERGE_METHOD = "/loramerge.v1.MergeService/Merge"
_CHUNK_DATA_TAG = b"\x1a"  # MergeChunk.data: field 3, length-delimited
_OFFSET_TAG = b"\x08"  # DataChunk.offset: field 1, varint
_BYTES_TAG = b"\x12"  # DataChunk.data: field 2, length-delimited


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_data_chunk(offset: int, payload: memoryview | bytes) -> bytes:
    """The serialized ``MergeChunk(data=DataChunk(offset=offset, data=payload))``."""
    inner_head = b""
    if offset:
        inner_head += _OFFSET_TAG + varint(offset)
    if len(payload):
        inner_head += _BYTES_TAG + varint(len(payload))
    inner_len = len(inner_head) + len(payload)
    return b"".join((_CHUNK_DATA_TAG, varint(inner_len), inner_head, payload))


def serialize_chunk(message: merge_pb2.MergeChunk | bytes) -> bytes:
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def decode_data_chunk(raw: bytes) -> tuple[int, memoryview] | None:
    """(offset, payload view) when ``raw`` is a serialized data MergeChunk laid out as
    ``encode_data_chunk`` writes it (as protobuf does); None otherwise (parse it with
    ``MergeChunk.FromString``). Lets a receiver copy each payload once, straight to its place."""
    try:
        return _decode(memoryview(raw))
    except IndexError:  # a varint running off the end
        return None


def _decode(view: memoryview) -> tuple[int, memoryview] | None:
    if not len(view) or view[0] != _CHUNK_DATA_TAG[0]:
        return None
    inner_len, pos = _read_varint(view, 1)
    end = pos + inner_len
    if end != len(view):
        return None
    offset = 0
    if pos < end and view[pos] == _OFFSET_TAG[0]:
        offset, pos = _read_varint(view, pos + 1)
    if pos == end:
        return offset, view[pos:pos]
    if view[pos] != _BYTES_TAG[0]:
        return None
    size, pos = _read_varint(view, pos + 1)
    if pos + size != end:
        return None
    return offset, view[pos:end]


@dataclass(frozen=True, slots=True)
class DataView:
    """A received data chunk: ``data`` is a view into the message's bytes (kept alive by the view)."""

    offset: int
    data: memoryview


def parse_chunk(raw: bytes) -> merge_pb2.MergeChunk | DataView:
    """A received Merge message: data chunks as ``DataView`` (no payload copy), the rest (and any data
    chunk laid out differently from protobuf's own encoding) as a parsed ``MergeChunk``."""
    decoded = decode_data_chunk(raw)
    if decoded is None:
        return merge_pb2.MergeChunk.FromString(raw)
    return DataView(*decoded)


def merge_method(channel: Any) -> Any:
    """The Merge method on a sync or asyncio channel, with ``parse_chunk`` as response deserializer:
    it yields ``MergeChunk | DataView`` (what the generated stub's ``Merge`` yields, data excepted)."""
    return channel.unary_stream(
        MERGE_METHOD,
        request_serializer=merge_pb2.MergeRequest.SerializeToString,
        response_deserializer=parse_chunk,
        _registered_method=True,
    )


def stream_chunks(
    header: merge_pb2.MergeHeader, data: bytes | bytearray, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[merge_pb2.MergeChunk]:
    """header → data chunks → trailer for ``data`` (header.total_bytes/sha256 must describe it)."""
    yield merge_pb2.MergeChunk(header=header)
    for start in range(0, len(data), chunk_bytes):
        piece = bytes(data[start : start + chunk_bytes])  # bytes even from a bytearray result
        yield merge_pb2.MergeChunk(data=merge_pb2.DataChunk(offset=start, data=piece))
    yield merge_pb2.MergeChunk(trailer=merge_pb2.MergeTrailer(total_bytes=len(data), sha256=header.sha256))


def folder_chunks(
    directory: str | Path, *, merge_key: str = "", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[merge_pb2.MergeChunk]:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) as a Merge stream."""
    folder = Path(directory)
    config = (folder / CONFIG_FILE).read_text()
    data = (folder / WEIGHTS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    rank = int(json.loads(config).get("r", 0) or 0)
    header = merge_pb2.MergeHeader(
        merge_key=merge_key,
        adapter_config_json=config,
        total_bytes=len(data),
        sha256=digest,
        rank=rank,
        base_model=json.loads(config).get("base_model_name_or_path") or "",
        file_name=WEIGHTS_FILE,
    )
    return stream_chunks(header, data, chunk_bytes)
