"""Reassembling a Merge stream (progress* → header → data* → trailer) into a verified adapter.

The receiver checks that data chunks are contiguous, that the size and sha256 match the header
and the trailer, and that a resumed stream continues the same merge. Only a verified result can
be written to disk, and it is written file by file through temporary names, so a reader never
sees a half-written adapter.

Data is hashed as it arrives and kept as the received pieces; the adapter's bytes are joined once, at
the end. Data chunks may arrive as ``DataView`` (``merge_method`` in clients/loramerge/stream.py: views
into the received messages, no protobuf copy) or inside parsed ``MergeChunk`` messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from loramerge.stream import DataView
from loramerge.v1 import merge_pb2
from loramerge_client.errors import make_error

CHUNK_BYTES = 1 << 20

ProgressCallback = Callable[[merge_pb2.MergeProgress], None]


@dataclass
class MergeResult:
    """A merged adapter received in full and verified against its sha256."""

    header: merge_pb2.MergeHeader
    data: bytes
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


def stream_chunks(
    header: merge_pb2.MergeHeader, data: bytes, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[merge_pb2.MergeChunk]:
    """header → data chunks → trailer for ``data`` (header.total_bytes/sha256 must describe it)."""
    yield merge_pb2.MergeChunk(header=header)
    for start in range(0, len(data), chunk_bytes):
        piece = data[start : start + chunk_bytes]
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


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _data_loss(message: str) -> Exception:
    return make_error(grpc.StatusCode.DATA_LOSS, message)


class MergeReceiver:
    """Feeds on MergeChunks, possibly over several (resumed) streams; ``result()`` verifies."""

    def __init__(self, on_progress: ProgressCallback | None = None) -> None:
        self.header: merge_pb2.MergeHeader | None = None
        self.trailer: merge_pb2.MergeTrailer | None = None
        self.progress: list[merge_pb2.MergeProgress] = []
        self.streams = 0
        self._pieces: list[bytes | memoryview] = []
        self._received = 0
        self._hash = hashlib.sha256()
        self._on_progress = on_progress
        self._stream_header: merge_pb2.MergeHeader | None = None

    @property
    def received(self) -> int:
        """Bytes of the safetensors file received so far (the resume offset)."""
        return self._received

    @property
    def merge_key(self) -> str:
        return self.header.merge_key if self.header else ""

    def request(self, spec: merge_pb2.MergeSpec) -> merge_pb2.MergeRequest:
        """The request for the next stream: from the start, or resuming where the last one broke."""
        self.streams += 1
        self._stream_header = None
        return merge_pb2.MergeRequest(
            spec=spec, resume_offset=self.received, expected_merge_key=self.merge_key
        )

    def feed_all(self, chunks: Iterable[merge_pb2.MergeChunk | DataView]) -> None:
        for chunk in chunks:
            self.feed(chunk)

    def feed(self, chunk: merge_pb2.MergeChunk | DataView) -> None:
        if isinstance(chunk, DataView):
            self._on_data(chunk)
            return
        kind = chunk.WhichOneof("item")
        if kind == "progress":
            self.progress.append(chunk.progress)
            if self._on_progress:
                self._on_progress(chunk.progress)
        elif kind == "header":
            self._on_header(chunk.header)
        elif kind == "data":
            self._on_data(chunk.data)
        elif kind == "trailer":
            if self._stream_header is None:
                raise _data_loss("merge stream sent a trailer before its header")
            self.trailer = chunk.trailer

    def _on_header(self, header: merge_pb2.MergeHeader) -> None:
        if self.header is not None:
            if header.merge_key != self.header.merge_key or header.sha256 != self.header.sha256:
                raise _data_loss(
                    f"resumed merge stream is for merge_key {header.merge_key!r}, "
                    f"expected {self.header.merge_key!r}"
                )
        else:
            self.header = header
        if header.offset != self.received:
            raise _data_loss(f"merge stream starts at offset {header.offset}, expected {self.received}")
        self._stream_header = header

    def _on_data(self, data: merge_pb2.DataChunk | DataView) -> None:
        if self._stream_header is None:
            raise _data_loss("merge stream sent data before its header")
        if data.offset != self.received:
            raise _data_loss(f"merge stream chunk at offset {data.offset}, expected {self.received}")
        if self.received + len(data.data) > self._stream_header.total_bytes:
            total = self._stream_header.total_bytes
            raise _data_loss(f"merge stream sent more than the announced {total} bytes")
        self._pieces.append(data.data)
        self._received += len(data.data)
        self._hash.update(data.data)

    def result(self) -> MergeResult:
        """The verified adapter; DataLoss when the stream was cut short or corrupted."""
        if self.header is None:
            raise _data_loss("merge stream ended without a header")
        if self.trailer is None:
            raise _data_loss(f"merge stream ended without a trailer after {self.received} bytes")
        expected = self.header.total_bytes
        if self.received != expected or self.trailer.total_bytes != expected:
            raise _data_loss(
                f"merged adapter is {self.received} bytes, header says {expected}, "
                f"trailer says {self.trailer.total_bytes}"
            )
        digest = self._hash.hexdigest()
        if digest != self.header.sha256 or self.trailer.sha256 != self.header.sha256:
            raise _data_loss(f"merged adapter sha256 is {digest}, header says {self.header.sha256}")
        return MergeResult(self.header, b"".join(self._pieces), self.progress, resumed=self.streams - 1)
