"""Receive a merged adapter in the Merge stream's chunk format and write it as a PEFT folder.

Both ways an adapter arrives use it: pulled from the merge service (``Merge``) and pushed by a
client (``LoadAdapter``). The header is checked against the served engine before a byte is written
(base model, rank, size, config), every data chunk must continue where the previous one ended,
and the file's size and sha256 are verified at the end. On any failure the folder is removed, so
nothing half written is ever loaded.

Data chunks may arrive as ``DataView`` (clients/loramerge/stream.py): the payload is written and hashed
straight from the received message, without protobuf copying it first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loramerge.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, shown
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from loramerge.stream import DataView
from loramerge.v1 import merge_pb2


@dataclass(frozen=True)
class AdapterLimits:
    """What the engine can load: checked on the header, before any data is accepted."""

    base_model: str
    max_rank: int
    max_bytes: int


def adapter_rank(config: dict[str, Any]) -> int:
    """The highest rank of any module: r, or the largest rank_pattern entry."""
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def same_model(a: str, b: str) -> bool:
    """Model names match exactly, or name the same local directory."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return (
        pa.is_absolute() and pb.is_absolute() and pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    )


def check_header(header: merge_pb2.MergeHeader, limits: AdapterLimits) -> dict[str, Any]:
    """Validate a header against what the engine serves; return the parsed adapter_config.json."""
    try:
        config = json.loads(header.adapter_config_json)
    except ValueError as e:
        raise InvalidArgument(
            f"header.adapter_config_json is not JSON: {e}", field="header.adapter_config_json"
        ) from None
    if not isinstance(config, dict):
        raise InvalidArgument(
            f"header.adapter_config_json must be a JSON object, got {type(config).__name__}",
            field="header.adapter_config_json",
        )
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidArgument(
            f"adapter peft_type must be LORA, got {shown(config.get('peft_type'))}",
            field="header.adapter_config_json",
        )
    if config.get("use_dora"):
        raise InvalidArgument("DoRA adapters cannot be served by vLLM (use_dora=true)", field="header")
    if config.get("bias", "none") != "none":
        raise InvalidArgument(f"adapter bias must be 'none', got {shown(config.get('bias'))}", field="header")
    base = header.base_model or str(config.get("base_model_name_or_path") or "")
    if not same_model(base, limits.base_model):
        raise FailedPrecondition(
            f"adapter base model {shown(base)} differs from the served model {shown(limits.base_model)}",
            field="header.base_model",
        )
    rank = header.rank or adapter_rank(config)
    if rank > limits.max_rank:
        raise FailedPrecondition(
            f"adapter rank {rank} exceeds the engine's max_lora_rank {limits.max_rank}", field="header.rank"
        )
    if header.total_bytes == 0:
        raise InvalidArgument("header.total_bytes must be > 0, got 0", field="header.total_bytes")
    if header.total_bytes > limits.max_bytes:
        raise ResourceExhausted(
            f"adapter of {header.total_bytes} bytes exceeds the limit of {limits.max_bytes} bytes",
            field="header.total_bytes",
        )
    if len(header.sha256) != 64:
        raise InvalidArgument(
            f"header.sha256 must be 64 hex digits, got {shown(header.sha256)}", field="header.sha256"
        )
    if header.file_name not in ("", WEIGHTS_FILE):
        raise InvalidArgument(
            f"header.file_name must be {shown(WEIGHTS_FILE)}, got {shown(header.file_name)}",
            field="header.file_name",
        )
    return config


@dataclass
class AdapterWriter:
    """Writes one adapter folder from a header and consecutive data chunks; resumable after a break."""

    directory: Path
    limits: AdapterLimits
    header: merge_pb2.MergeHeader | None = None
    config: dict[str, Any] = field(default_factory=dict)
    received: int = 0
    header_at: float | None = None  # time.perf_counter() when the first header arrived
    _hash: Any = field(default_factory=hashlib.sha256)
    _file: IO[bytes] | None = None

    def start(self, header: merge_pb2.MergeHeader) -> None:
        """Accept the first header, or the header of a resumed stream (same merge, at our offset)."""
        if self.header is not None:
            if header.merge_key != self.header.merge_key or header.sha256 != self.header.sha256:
                raise FailedPrecondition(
                    f"resumed stream is merge {shown(header.merge_key)}, expected "
                    f"{shown(self.header.merge_key)}",
                    field="header.merge_key",
                )
            if header.offset != self.received:
                raise InvalidArgument(
                    f"resumed stream starts at byte {header.offset}, expected {self.received}",
                    field="header.offset",
                )
            return
        if header.offset != 0:
            raise InvalidArgument(
                f"header.offset must be 0 on a new stream, got {header.offset}", field="header.offset"
            )
        self.config = check_header(header, self.limits)
        self.header = header
        self.header_at = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=False)
        (self.directory / CONFIG_FILE).write_text(header.adapter_config_json)
        self._file = open(self.directory / WEIGHTS_FILE, "wb")  # noqa: SIM115 - closed in finish/discard

    def write(self, chunk: merge_pb2.DataChunk | DataView) -> None:
        if self.header is None or self._file is None:
            raise InvalidArgument("a data chunk arrived before the header", field="data")
        if chunk.offset != self.received:
            raise InvalidArgument(
                f"data chunk at byte {chunk.offset}, expected byte {self.received}", field="data.offset"
            )
        if self.received + len(chunk.data) > self.header.total_bytes:
            raise InvalidArgument(
                f"data runs past header.total_bytes {self.header.total_bytes} "
                f"(chunk at {chunk.offset} of {len(chunk.data)} bytes)",
                field="data",
            )
        self._file.write(chunk.data)
        self._hash.update(chunk.data)
        self.received += len(chunk.data)

    def finish(self, trailer: merge_pb2.MergeTrailer | None) -> None:
        """Verify size and sha256 against the header (and the trailer, when there is one)."""
        if self.header is None or self._file is None:
            raise InvalidArgument("the stream ended before a header arrived", field="header")
        self._file.close()
        if self.received != self.header.total_bytes:
            raise InvalidArgument(
                f"received {self.received} bytes, header.total_bytes says {self.header.total_bytes}",
                field="data",
            )
        digest = self._hash.hexdigest()
        if digest != self.header.sha256.lower():
            raise InvalidArgument(
                f"sha256 {digest} differs from header.sha256 {self.header.sha256}", field="data"
            )
        if trailer is not None and (trailer.total_bytes, trailer.sha256.lower()) != (self.received, digest):
            raise InvalidArgument(
                f"trailer ({trailer.total_bytes} bytes, sha256 {trailer.sha256}) disagrees with the data "
                f"({self.received} bytes, sha256 {digest})",
                field="trailer",
            )

    def discard(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class Received:
    header: merge_pb2.MergeHeader
    config: dict[str, Any]
    directory: Path
    bytes: int
    header_ms: float  # from the first chunk asked for to the header (the merge itself)
    transfer_ms: float  # from the header to the last byte


async def receive(chunks: AsyncIterator[merge_pb2.MergeChunk | DataView], writer: AdapterWriter) -> Received:
    """Feed a whole chunk stream (progress* header data* trailer?) through ``writer``.

    The trailer is optional for pushed streams; the header's size and sha256 are always checked.
    The caller discards the writer on error.
    """
    t0 = time.perf_counter()
    t_header = t0
    trailer = None
    async for chunk in chunks:
        if isinstance(chunk, DataView):
            writer.write(chunk)
            continue
        kind = chunk.WhichOneof("item")
        if kind == "header":
            writer.start(chunk.header)
            t_header = time.perf_counter()
        elif kind == "data":
            writer.write(chunk.data)
        elif kind == "trailer":
            trailer = chunk.trailer
            break
    writer.finish(trailer)
    assert writer.header is not None
    t_end = time.perf_counter()
    return Received(
        header=writer.header,
        config=writer.config,
        directory=writer.directory,
        bytes=writer.received,
        header_ms=(t_header - t0) * 1e3,
        transfer_ms=(t_end - t_header) * 1e3,
    )
