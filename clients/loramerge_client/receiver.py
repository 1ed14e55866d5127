"""A merged adapter received by the client: the contract's receiver (``loramerge.receiver``) into memory.

The stream is verified as it arrives (contiguous data, size and sha256 against header and trailer,
a resumed stream continuing the same merge). Only a verified result can be written to disk, and it
is written file by file through temporary names, so a reader never sees a half-written adapter.
Data chunks arrive as ``DataView`` (``loramerge.stream.merge_method``): each payload is a view into
the received message, copied once onto the end of the result.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.errors import DataLoss
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from loramerge.receiver import MemorySink, ProgressCallback, StreamReceiver
from loramerge.stream import CHUNK_BYTES, stream_chunks
from loramerge.v1 import merge_pb2


@dataclass
class MergeResult:
    """A merged adapter received in full and verified against its sha256."""

    header: merge_pb2.MergeHeader
    data: bytes | bytearray  # the safetensors file (a bytearray when received: no copy to bytes)
    progress: list[merge_pb2.MergeProgress] = field(default_factory=list)
    resumed: int = 0  # how many times the stream was resumed after a broken connection

    @property
    def merge_key(self) -> str:
        return self.header.merge_key

    @property
    def sha256(self) -> str:
        return self.header.sha256

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.header.adapter_config_json)

    @property
    def file_name(self) -> str:
        return self.header.file_name or WEIGHTS_FILE

    def write(self, directory: str | Path) -> Path:
        """Write a PEFT adapter folder (weights first, then the config that marks it complete)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / self.file_name, self.data)
        _atomic_write(out / CONFIG_FILE, self.header.adapter_config_json.encode())
        return out

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[merge_pb2.MergeChunk]:
        """The adapter again in the Merge stream format, e.g. to push it with LoadAdapter."""
        header = merge_pb2.MergeHeader()
        header.CopyFrom(self.header)
        header.offset = 0
        yield from stream_chunks(header, self.data, chunk_bytes)


def _atomic_write(path: Path, data: bytes | bytearray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MergeReceiver(StreamReceiver):
    """The contract's receiver into memory, faults as DataLoss, a trailer required; ``result()``
    verifies and returns the adapter. ``request`` starts each (resumed) stream."""

    def __init__(self, on_progress: ProgressCallback | None = None) -> None:
        self._memory = MemorySink()
        super().__init__(
            self._memory, fault=DataLoss, mismatch=DataLoss, on_progress=on_progress, require_trailer=True
        )

    def request(self, spec: merge_pb2.MergeSpec) -> merge_pb2.MergeRequest:
        """The request for the next stream: from the start, or resuming where the last one broke."""
        self.new_stream()
        return merge_pb2.MergeRequest(
            spec=spec, resume_offset=self.received, expected_merge_key=self.merge_key
        )

    def result(self) -> MergeResult:
        """The verified adapter; DataLoss when the stream was cut short or corrupted."""
        self.finish()
        assert self.header is not None
        return MergeResult(self.header, self._memory.data, self.progress, resumed=self.streams - 1)
