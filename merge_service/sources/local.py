"""Adapters in a local directory tree: the id is a relative path under the configured adapter root.

Path safety: an id that is absolute, contains "..", or resolves (through symlinks, of the directory or
of either file) to a place outside the root is refused with InvalidArgument; an id that is well formed
but names nothing is NotFound. Both files must be regular files, so a FIFO or device cannot block a read.

The digest is content-addressed: sha256 over the sha256 of each file, so the same bytes under two ids
give the same merge key. Per-file hashes are cached by (path, size, mtime, inode, ctime), so a
repeated request for an unchanged adapter does not reread it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from loramerge.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from merge_service.sources.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResolvedSource,
    check_size,
    missing_weights_error,
)
from merge_service.spec import AdapterRef, SourceKind

_CHUNK = 1 << 20


class DigestCache:
    """sha256 of files, remembered while their stat signature is unchanged (bounded, thread-safe)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._entries: OrderedDict[tuple, str] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # bytes actually read, for tests and metrics

    @staticmethod
    def _signature(path: str, st: os.stat_result) -> tuple:
        return (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def sha256(self, path: str) -> str:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            key = self._signature(path, before)
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key]
            h = hashlib.sha256()
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                self.hashed_bytes += len(chunk)
            after = os.fstat(f.fileno())
        digest = h.hexdigest()
        if self._signature(path, after) == key:  # not modified while we read it
            with self._lock:
                self._entries[key] = digest
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return digest


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


class LocalSource:
    kind = SourceKind.LOCAL

    def __init__(
        self, root: Path, max_adapter_bytes: int | None = None, digests: DigestCache | None = None
    ) -> None:
        self.root = Path(root)
        self.max_adapter_bytes = max_adapter_bytes
        self.digests = digests or DigestCache()

    @staticmethod
    def check_id(adapter_id: str) -> PurePosixPath:
        """The id as a relative path, or InvalidArgument if it could name something outside the root."""
        if not adapter_id or "\x00" in adapter_id:
            raise InvalidArgument(f"adapter id {shown(adapter_id)} is not a valid path", field="adapter")
        rel = PurePosixPath(adapter_id)
        if rel.is_absolute() or adapter_id.startswith("~"):
            raise InvalidArgument(
                f"adapter {shown(adapter_id)}: local adapter ids are paths relative to the adapter root, "
                "not absolute paths",
                field="adapter",
            )
        if ".." in rel.parts:
            raise InvalidArgument(
                f"adapter {shown(adapter_id)}: local adapter ids must not contain '..'", field="adapter"
            )
        if not rel.parts:
            raise InvalidArgument(
                f"adapter {shown(adapter_id)} names the adapter root itself", field="adapter"
            )
        return rel

    @staticmethod
    def is_path_like(adapter_id: str) -> bool:
        """Ids that can only be meant as paths (absolute, home-relative, climbing with "..")."""
        rel = PurePosixPath(adapter_id)
        return rel.is_absolute() or adapter_id.startswith("~") or ".." in rel.parts

    def exists(self, adapter_id: str) -> bool:
        """Whether the id names an entry (even a dangling symlink) under the root; for AUTO detection."""
        try:
            rel = self.check_id(adapter_id)
        except InvalidArgument:
            return False
        return os.path.lexists(self.root / rel)

    def resolve(self, ref: AdapterRef) -> ResolvedSource:
        aid = ref.id
        rel = self.check_id(aid)
        if ref.revision:
            raise InvalidArgument(
                f"adapter {shown(aid)}: revision {shown(ref.revision)} applies to hub and S3 "
                "adapters, not local ones",
                field="adapter",
            )
        root = os.path.realpath(self.root)
        if not os.path.isdir(root):
            raise FailedPrecondition(
                f"the adapter root {str(self.root)!r} is not a directory", field="adapter"
            )
        directory = os.path.realpath(os.path.join(root, *rel.parts))
        if not _inside(root, directory) or directory == root:
            raise InvalidArgument(
                f"adapter {shown(aid)} resolves to a path outside the adapter root", field="adapter"
            )
        if not os.path.isdir(directory):
            raise NotFound(
                f"adapter {shown(aid)}: no adapter directory of that name under the adapter root",
                field="adapter",
            )

        sizes = 0
        files: list[str] = []
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            real = os.path.realpath(os.path.join(directory, name))
            if not _inside(root, real):
                raise InvalidArgument(
                    f"adapter {shown(aid)}: {name} resolves to a path outside the adapter root",
                    field="adapter",
                )
            try:
                st = os.stat(real)
            except FileNotFoundError:
                if name == WEIGHTS_FILE:
                    raise missing_weights_error(Path(directory), aid) from None
                raise NotFound(f"adapter {shown(aid)}: has no {name}", field="adapter") from None
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"adapter {shown(aid)}: {name} is not a regular file", field="adapter")
            sizes += st.st_size
            files.append(real)
        check_size(aid, sizes, self.max_adapter_bytes)

        try:
            hashes = [self.digests.sha256(p) for p in files]
        except OSError as e:
            raise FailedPrecondition(
                f"adapter {shown(aid)}: cannot read its files: {e.strerror}", field="adapter"
            ) from None
        combined = "".join(
            f"{name} {h}\n" for name, h in zip((CONFIG_FILE, WEIGHTS_FILE), hashes, strict=True)
        )
        digest = "sha256:" + hashlib.sha256(combined.encode()).hexdigest()
        return ResolvedSource(
            id=aid, kind=SourceKind.LOCAL, revision="", digest=digest, path=Path(directory), nbytes=sizes
        )
