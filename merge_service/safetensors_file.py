"""A safetensors file laid out before its tensors exist, filled in place and hashed as it fills.

A merge knows every output tensor's name, dtype and shape from its plan, so the file's header and each
tensor's offset are known before the first module is merged. ``SafetensorsFile`` allocates the final
``bytes`` object once, hands out each tensor's slot as a writable tensor view, and feeds sha256 on a
second thread with the filled prefix of the file while later modules are still merging. Against
building every tensor and joining them afterwards this saves one copy of the output and, more
important on a fresh process or one whose memory tier keeps earlier merges, the page faults of a
second output-sized allocation.

The layout is fixed (the bytes of one merge key never vary): an 8-byte little-endian header length,
the JSON header listing ``__metadata__`` and then the tensors in sorted-name order, padded with
spaces to a multiple of 8 bytes, then the data in the same order. (safetensors' own writer keeps the
metadata in a hash map, whose order varies.)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
BASE_METADATA = {"format": "pt"}

# PyBytes_FromStringAndSize(NULL, n) is the C API's way to build a bytes object in place: its contents
# are undefined until written, and it must not be shared before then. The object never leaves this
# module unfilled: ``SafetensorsFile.finish`` is the only way out.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]
_bytes_buffer = ctypes.pythonapi.PyBytes_AsString
_bytes_buffer.restype = ctypes.c_void_p
_bytes_buffer.argtypes = [ctypes.py_object]


class TensorEntry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def safetensors_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the padded JSON header of a file of ``entries`` (any order given)."""
    header: dict[str, Any] = {
        "__metadata__": {k: str(v) for k, v in sorted({**BASE_METADATA, **(metadata or {})}.items())}
    }
    offset = 0
    for e in sorted(entries, key=lambda e: e.name):
        header[e.name] = {
            "dtype": DTYPE_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class SafetensorsFile:
    """One safetensors file, filled tensor by tensor: ``slot(name)`` → write it → ``filled(name)``;
    then ``finish()`` returns the bytes and their hex sha256.

    With ``hash_thread`` the hash follows the filled prefix of the file on a second thread (hashlib
    releases the GIL), so at ``finish`` only the tail is left to hash. Use as a context manager: leaving
    it, normally or on an error, stops that thread."""

    def __init__(
        self, entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None, *, hash_thread: bool
    ) -> None:
        if len({e.name for e in entries}) != len(entries):
            raise ValueError("tensor names must be distinct")
        header = safetensors_header(entries, metadata)
        self._order = sorted(entries, key=lambda e: e.name)
        self._index = {e.name: i for i, e in enumerate(self._order)}
        self._starts: list[int] = []
        at = len(header)
        for e in self._order:
            self._starts.append(at)
            at += e.nbytes
        self.nbytes = at
        self._data: bytes = _new_bytes(None, at)
        buffer = (ctypes.c_uint8 * at).from_address(_bytes_buffer(self._data))
        buffer._owner = self._data  # type: ignore[attr-defined]  # views keep the bytes alive
        self._view = np.ctypeslib.as_array(buffer)
        self._view[: len(header)] = np.frombuffer(header, dtype=np.uint8)
        self._filled = [False] * len(self._order)
        self._hash = hashlib.sha256(header)
        self._hashed_to = 0  # entries [0, _hashed_to) are in the hash, after the header
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if hash_thread:
            self._thread = threading.Thread(target=self._follow, name="sha256", daemon=True)
            self._thread.start()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def slot(self, name: str) -> torch.Tensor:
        """The writable place of tensor ``name`` in the file, as a tensor of its dtype and shape."""
        i = self._index[name]
        e, start = self._order[i], self._starts[i]
        raw = torch.from_numpy(self._view[start : start + e.nbytes])
        return raw.view(e.dtype).view(e.shape)

    def filled(self, name: str) -> None:
        """Tensor ``name`` is written: the hash may read it."""
        with self._cond:
            self._filled[self._index[name]] = True
            self._cond.notify()

    def finish(self) -> tuple[bytes, str]:
        """The file's bytes and hex sha256; every tensor must have been filled."""
        missing = [e.name for e, f in zip(self._order, self._filled, strict=True) if not f]
        if missing:
            raise ValueError(f"{len(missing)} tensors were never filled, the first {missing[0]!r}")
        self._stop()
        self._hash_ready(len(self._order))  # what the thread had not reached (all of it without one)
        data, self._data = self._data, b""
        del self._view
        return data, self._hash.hexdigest()

    def _span(self, i: int, j: int) -> memoryview:
        return memoryview(self._view[self._starts[i] : self._starts[j - 1] + self._order[j - 1].nbytes])

    def _hash_ready(self, upto: int) -> None:
        """Hash entries [_hashed_to, upto) (called by one thread at a time)."""
        if upto > self._hashed_to:
            self._hash.update(self._span(self._hashed_to, upto))
            self._hashed_to = upto

    def _follow(self) -> None:
        n = len(self._order)
        while True:
            with self._cond:
                while not self._closed and (self._hashed_to == n or not self._filled[self._hashed_to]):
                    self._cond.wait()
                if self._closed:
                    return
                upto = self._hashed_to
                while upto < n and self._filled[upto]:
                    upto += 1
            self._hash_ready(upto)

    def _stop(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._thread = None


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors bytes of ``tensors`` in the fixed layout; each tensor byte is copied once."""
    entries = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsFile(entries, metadata, hash_thread=False) as f:
        for name, t in tensors.items():
            f.slot(name).copy_(t.detach())
            f.filled(name)
        return f.finish()[0]
