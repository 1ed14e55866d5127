"""Receive a merged adapter in the Merge stream's chunk format and write it as a PEFT folder.

Both ways an adapter arrives use it: pulled from the merge service (``Merge``) and pushed by a
client (``LoadAdapter``). The header is checked against the served engine before a byte is written
(base model, rank, size, config), every data chunk must continue where the previous one ended,
and the file's size and sha256 are verified at the end. On any failure the folder is removed, so
nothing half written is ever loaded.

The stream itself is checked by the contract's one receiver (``loramerge.receiver``); what is
specific here is the header policy (``check_header``: what this engine can serve) and the folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, shown
from loramerge.peft import WEIGHTS_FILE
from loramerge.receiver import FolderSink, StreamReceiver, receive_stream
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


class AdapterWriter(StreamReceiver):
    """A stream received into a PEFT folder the engine can load, its header checked against ``limits``
    before a byte is written; resumable after a break; ``discard`` removes the folder."""

    def __init__(self, directory: Path, limits: AdapterLimits) -> None:
        super().__init__(FolderSink(directory), check_header=lambda header: check_header(header, limits))
        self.directory = directory
        self.limits = limits


@dataclass(frozen=True)
class Received:
    header: merge_pb2.MergeHeader
    config: dict[str, Any]
    directory: Path
    bytes: int
    header_ms: float  # from the first chunk asked for to the header (the merge itself)
    transfer_ms: float  # from the header to the last byte


async def receive(chunks: AsyncIterator[merge_pb2.MergeChunk | DataView], writer: AdapterWriter) -> Received:
    """Feed a whole chunk stream (progress* header data* trailer?) through ``writer`` and verify it.

    The trailer is optional for pushed streams; the header's size and sha256 are always checked.
    The caller discards the writer on error.
    """
    t0 = time.perf_counter()
    await receive_stream(chunks, writer)
    writer.finish()
    assert writer.header is not None
    t_header = writer.stream_header_at or t0
    t_end = time.perf_counter()
    return Received(
        header=writer.header,
        config=writer.config,
        directory=writer.directory,
        bytes=writer.received,
        header_ms=(t_header - t0) * 1e3,
        transfer_ms=(t_end - t_header) * 1e3,
    )
