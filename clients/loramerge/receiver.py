"""One receiver for the Merge stream's chunk format, wherever an adapter arrives.

A stream is ``progress* → header → data* → trailer``; a broken one is resumed by a new stream whose
header carries the byte offset reached. The receiver checks what the contract promises: a header
before any data or trailer, each data chunk continuing where the previous one ended, no byte past
``header.total_bytes``, a resumed stream continuing the same merge at our offset, and at the end the
size and sha256 against the header (and the trailer, when there is one). What a header is checked
against beyond that (base model, rank, size limits) is the caller's policy: ``check_header``.

Bytes go to a ``Sink``: ``MemorySink`` (the client's ``MergeResult``) or ``FolderSink`` (a PEFT folder
that the inference service loads: config written at the header, weights streamed to disk, the folder
removed on any failure). Data chunks may arrive as ``DataView`` (``loramerge.stream.merge_method``):
the payload is then written and hashed straight from the received message, with no protobuf copy.

Faults raise ``fault`` (e.g. ``InvalidArgument`` for a pushed stream, which is the caller's input,
``DataLoss`` in the client), a resumed stream of another merge ``mismatch``; each names the field.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import AsyncIterable, Callable, Iterable
from pathlib import Path
from typing import IO, Any, Protocol

from loramerge.errors import FailedPrecondition, InvalidArgument, LoramergeError, shown
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from loramerge.stream import DataView
from loramerge.v1 import merge_pb2

Chunk = merge_pb2.MergeChunk | DataView
ProgressCallback = Callable[[merge_pb2.MergeProgress], None]
HeaderCheck = Callable[[merge_pb2.MergeHeader], dict[str, Any]]


class Sink(Protocol):
    """Where the adapter's bytes go: opened at the first header, closed once verified."""

    def open(self, header: merge_pb2.MergeHeader) -> None: ...
    def write(self, data: memoryview | bytes) -> None: ...
    def close(self) -> None: ...
    def discard(self) -> None: ...


class MemorySink:
    """One buffer of the header's size, each payload copied once into place (``data``); the received
    messages are freed as soon as they are written. A header announcing more than ``preallocate_limit``
    bytes gets a buffer that grows as data arrives instead, so a wrong size cannot reserve memory."""

    def __init__(self, preallocate_limit: int = 8 << 30) -> None:
        self.preallocate_limit = preallocate_limit
        self.data = bytearray()
        self._view: memoryview | None = None
        self._end = 0

    def open(self, header: merge_pb2.MergeHeader) -> None:
        if header.total_bytes <= self.preallocate_limit:
            self.data = bytearray(header.total_bytes)
            self._view = memoryview(self.data)

    def write(self, data: memoryview | bytes) -> None:
        n = len(data)
        if self._view is not None:
            self._view[self._end : self._end + n] = data
        else:
            self.data += data
        self._end += n

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        del self.data[self._end :]  # a stream cut short: keep what arrived (the size check fails)

    def discard(self) -> None:
        self.close()
        self.data = bytearray()


class FolderSink:
    """A PEFT adapter folder: created at the header (it must not exist), removed by ``discard``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None

    def open(self, header: merge_pb2.MergeHeader) -> None:
        self.directory.mkdir(parents=True, exist_ok=False)
        (self.directory / CONFIG_FILE).write_text(header.adapter_config_json)
        self._file = open(self.directory / WEIGHTS_FILE, "wb")  # noqa: SIM115 - closed in close/discard

    def write(self, data: memoryview | bytes) -> None:
        assert self._file is not None
        self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def discard(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class StreamReceiver:
    """Feeds on chunks, possibly over several (resumed) streams; ``finish`` verifies and closes."""

    def __init__(
        self,
        sink: Sink,
        *,
        fault: type[LoramergeError] = InvalidArgument,
        mismatch: type[LoramergeError] = FailedPrecondition,
        check_header: HeaderCheck | None = None,
        on_progress: ProgressCallback | None = None,
        require_trailer: bool = False,
    ) -> None:
        self.sink = sink
        self.fault = fault
        self.mismatch = mismatch
        self.require_trailer = require_trailer
        self._check_header = check_header
        self._on_progress = on_progress
        self.header: merge_pb2.MergeHeader | None = None
        self.trailer: merge_pb2.MergeTrailer | None = None
        self.config: dict[str, Any] = {}
        self.progress: list[merge_pb2.MergeProgress] = []
        self.received = 0  # bytes of the weights file so far: the offset a resumed stream starts at
        self.streams = 0
        self.header_at: float | None = None  # time.perf_counter() when the first header arrived
        self.stream_header_at: float | None = None  # ... and when the current stream's header did
        self._stream_header: merge_pb2.MergeHeader | None = None
        self._hash = hashlib.sha256()

    @property
    def merge_key(self) -> str:
        return self.header.merge_key if self.header else ""

    def new_stream(self) -> None:
        """A new (or resumed) stream begins: it must open with its own header."""
        self.streams += 1
        self._stream_header = None

    def feed_all(self, chunks: Iterable[Chunk]) -> None:
        for chunk in chunks:
            self.feed(chunk)

    def feed(self, chunk: Chunk) -> None:
        if isinstance(chunk, DataView):
            self.write(chunk)
            return
        kind = chunk.WhichOneof("item")
        if kind == "progress":
            self.progress.append(chunk.progress)
            if self._on_progress:
                self._on_progress(chunk.progress)
        elif kind == "header":
            self.start(chunk.header)
        elif kind == "data":
            self.write(chunk.data)
        elif kind == "trailer":
            if self._stream_header is None:
                raise self.fault("a trailer arrived before the header", field="trailer")
            self.trailer = chunk.trailer

    def start(self, header: merge_pb2.MergeHeader) -> None:
        """The first header, or the header of a resumed stream (same merge, at our offset)."""
        if self.header is not None:
            if header.merge_key != self.header.merge_key or header.sha256 != self.header.sha256:
                raise self.mismatch(
                    f"resumed stream is merge {shown(header.merge_key)}, expected "
                    f"{shown(self.header.merge_key)}",
                    field="header.merge_key",
                )
            if header.offset != self.received:
                raise self.fault(
                    f"resumed stream starts at byte {header.offset}, expected {self.received}",
                    field="header.offset",
                )
            self._stream_header = header
            self.stream_header_at = time.perf_counter()
            return
        if header.offset != 0:
            raise self.fault(
                f"header.offset must be 0 on a new stream, got {header.offset}", field="header.offset"
            )
        if self._check_header is not None:
            self.config = self._check_header(header)
        self.sink.open(header)
        self.header = self._stream_header = header
        self.header_at = self.stream_header_at = time.perf_counter()

    def write(self, chunk: merge_pb2.DataChunk | DataView) -> None:
        header = self._stream_header
        if header is None:
            raise self.fault("a data chunk arrived before the header", field="data")
        if chunk.offset != self.received:
            raise self.fault(
                f"data chunk at byte {chunk.offset}, expected byte {self.received}", field="data.offset"
            )
        if self.received + len(chunk.data) > header.total_bytes:
            raise self.fault(
                f"data runs past header.total_bytes {header.total_bytes} "
                f"(chunk at {chunk.offset} of {len(chunk.data)} bytes)",
                field="data",
            )
        self.sink.write(chunk.data)
        self._hash.update(chunk.data)
        self.received += len(chunk.data)

    def finish(self, trailer: merge_pb2.MergeTrailer | None = None) -> None:
        """Verify size and sha256 against the header (and the trailer, when there is one); close."""
        if trailer is not None:
            self.trailer = trailer
        if self.header is None:
            raise self.fault("the stream ended before a header arrived", field="header")
        self.sink.close()
        if self.trailer is None and self.require_trailer:
            raise self.fault(
                f"the stream ended without a trailer after {self.received} bytes", field="trailer"
            )
        if self.received != self.header.total_bytes:
            raise self.fault(
                f"received {self.received} bytes, header.total_bytes says {self.header.total_bytes}",
                field="data",
            )
        digest = self._hash.hexdigest()
        if digest != self.header.sha256.lower():
            raise self.fault(f"sha256 {digest} differs from header.sha256 {self.header.sha256}", field="data")
        t = self.trailer
        if t is not None and (t.total_bytes, t.sha256.lower()) != (self.received, digest):
            raise self.fault(
                f"trailer ({t.total_bytes} bytes, sha256 {t.sha256}) disagrees with the data "
                f"({self.received} bytes, sha256 {digest})",
                field="trailer",
            )

    def discard(self) -> None:
        self.sink.discard()


async def receive_stream(chunks: AsyncIterable[Chunk], receiver: StreamReceiver) -> None:
    """Feed one stream through ``receiver`` up to its trailer (not verified: see ``finish``)."""
    receiver.new_stream()
    receiver.stream_header_at = None
    async for chunk in chunks:
        receiver.feed(chunk)
        if receiver.trailer is not None:
            break
