"""Merged adapters by merge key: an in-memory LRU bounded in bytes in front of an optional disk directory.

The memory tier keeps whole entries (the safetensors bytes plus the manifest) and drops the least
recently used ones to stay under its bound; an entry larger than the bound is not kept in memory
(it may still go to disk). The disk tier holds two files per key: ``<key>.safetensors`` and
``<key>.json`` (the manifest, written last, so its presence marks a complete entry). Both are written
to a temporary file, fsynced and renamed into place, so a crash never leaves a half-written entry
under a real name. A read checks size and sha256; a mismatch deletes the entry and counts as a miss.
The disk tier stays under its bound by dropping the least recently used files (mtime, touched on
each hit). Losing either tier loses only time.

Thread-safe: the servicer reads the memory tier on the event loop and runs disk work in threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.errors import InvalidArgument
from merge_service.merged import MergedAdapter, ModuleStat
from merge_service.metrics import MergeMetrics

log = logging.getLogger(__name__)

META_VERSION = 1
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
DATA_SUFFIX = ".safetensors"
META_SUFFIX = ".json"
TMP_MARK = ".tmp-"
# Pods sharing a cache volume all run as pid 1: temporary names carry the host name and a random part,
# and start-up removes only temporary files this old (younger ones may be another pod's write).
STALE_TMP_SECONDS = 3600.0


def manifest(entry: MergedAdapter) -> dict[str, Any]:
    """The disk tier's ``<key>.json``: everything of the entry but its bytes."""
    return {
        "version": META_VERSION,
        "merge_key": entry.merge_key,
        "bytes": entry.nbytes,
        "sha256": entry.sha256,
        "config_json": entry.config_json,
        "rank": entry.rank,
        "modules": [list(m) for m in entry.modules],
        "base_model": entry.base_model,
        "build_seconds": entry.build_seconds,
    }


@dataclass(frozen=True)
class CachedInfo:
    """What ListCached reports about one key."""

    merge_key: str
    bytes: int
    in_memory: bool
    on_disk: bool
    rank: int
    base_model: str
    hits: int


def check_key(merge_key: str, field: str = "merge_key") -> str:
    """A merge key safe to use as a file name (keys are hex digests; anything else is refused)."""
    if not _KEY_RE.match(merge_key) or merge_key.startswith("."):
        raise InvalidArgument(f"{field} is not a merge key, got {merge_key[:80]!r}", field=field)
    return merge_key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MemoryTier:
    """LRU of MergedAdapter bounded by the sum of their data sizes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, MergedAdapter] = OrderedDict()

    def get(self, key: str) -> MergedAdapter | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def peek(self, key: str) -> MergedAdapter | None:
        """Like get, without refreshing the entry's place in the LRU order."""
        return self._entries.get(key)

    def put(self, entry: MergedAdapter) -> list[str]:
        """Insert (or refresh) ``entry``; returns the keys dropped to make room. An entry above the
        bound is not stored."""
        self.pop(entry.merge_key)
        if entry.nbytes > self.limit_bytes:
            return []
        dropped = []
        while self._entries and self.bytes + entry.nbytes > self.limit_bytes:
            old_key, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            dropped.append(old_key)
        self._entries[entry.merge_key] = entry
        self.bytes += entry.nbytes
        return dropped

    def pop(self, key: str) -> MergedAdapter | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.nbytes
        return entry

    def list_keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{socket.gethostname()}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class DiskTier:
    """``<key>.safetensors`` + ``<key>.json`` per entry under ``directory``, bounded in bytes."""

    def __init__(self, directory: Path, limit_bytes: int, metrics: MergeMetrics | None = None) -> None:
        self.dir = Path(directory)
        self.limit_bytes = limit_bytes
        self.metrics = metrics
        self.dir.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STALE_TMP_SECONDS
        for tmp in self.dir.glob(f"*{TMP_MARK}*"):  # left by a crash mid-write, or being written now
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def _data(self, key: str) -> Path:
        return self.dir / f"{key}{DATA_SUFFIX}"

    def _meta(self, key: str) -> Path:
        return self.dir / f"{key}{META_SUFFIX}"

    def list_keys(self) -> list[str]:
        return sorted(
            p.name[: -len(META_SUFFIX)] for p in self.dir.glob(f"*{META_SUFFIX}") if TMP_MARK not in p.name
        )

    def read_meta(self, key: str) -> dict[str, Any] | None:
        try:
            meta = json.loads(self._meta(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self._corrupt(key, "unreadable manifest")
            return None
        if not isinstance(meta, dict) or meta.get("version") != META_VERSION or meta.get("merge_key") != key:
            self._corrupt(key, "manifest of another version or key")
            return None
        return meta

    def get(self, key: str) -> MergedAdapter | None:
        meta = self.read_meta(key)
        if meta is None:
            return None
        try:
            data = self._data(key).read_bytes()
        except OSError:
            self._corrupt(key, "missing data file")
            return None
        if len(data) != meta.get("bytes") or sha256_hex(data) != meta.get("sha256"):
            self._corrupt(key, "size or sha256 mismatch")
            return None
        try:
            entry = MergedAdapter(
                merge_key=key,
                config_json=str(meta["config_json"]),
                data=data,
                sha256=str(meta["sha256"]),
                rank=int(meta["rank"]),
                modules=tuple(ModuleStat(str(n), int(r), float(e)) for n, r, e in meta["modules"]),
                base_model=str(meta["base_model"]),
                build_seconds=float(meta["build_seconds"]),
            )
        except (KeyError, TypeError, ValueError):
            self._corrupt(key, "malformed manifest")
            return None
        now = time.time()
        for p in (self._data(key), self._meta(key)):
            with contextlib.suppress(OSError):
                os.utime(p, (now, now))
        return entry

    def put(self, entry: MergedAdapter) -> list[str]:
        """Store ``entry`` (data first, manifest last); returns keys dropped to stay within the bound."""
        if entry.nbytes > self.limit_bytes:
            return []
        atomic_write(self._data(entry.merge_key), entry.data)
        atomic_write(self._meta(entry.merge_key), json.dumps(manifest(entry)).encode())
        return self._shrink(keep=entry.merge_key)

    def remove(self, key: str) -> bool:
        found = False
        for p in (self._meta(key), self._data(key)):  # manifest first: the entry stops existing at once
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                found = True
        return found

    def sizes(self) -> dict[str, tuple[int, float]]:
        """key -> (bytes on disk, last use time) for complete entries."""
        out = {}
        for key in self.list_keys():
            try:
                d, m = self._data(key).stat(), self._meta(key).stat()
            except OSError:
                continue
            out[key] = (d.st_size + m.st_size, max(d.st_mtime, m.st_mtime))
        return out

    def total_bytes(self) -> int:
        return sum(size for size, _ in self.sizes().values())

    def _shrink(self, keep: str | None = None) -> list[str]:
        sizes = self.sizes()
        total = sum(s for s, _ in sizes.values())
        dropped = []
        for key, (size, _) in sorted(sizes.items(), key=lambda kv: kv[1][1]):
            if total <= self.limit_bytes:
                break
            if key == keep:
                continue
            self.remove(key)
            total -= size
            dropped.append(key)
        return dropped

    def _corrupt(self, key: str, why: str) -> None:
        log.warning("dropping corrupt disk cache entry", extra={"merge_key": key, "reason": why})
        if self.metrics:
            self.metrics.cache_corrupt.inc()
        self.remove(key)


class MergeCache:
    """The two tiers together. ``get_memory`` never blocks; ``get``/``put`` may do disk I/O (call them
    in a thread from async code)."""

    def __init__(
        self,
        memory_bytes: int,
        disk_dir: Path | None = None,
        disk_bytes: int = 0,
        metrics: MergeMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.memory = MemoryTier(memory_bytes)
        self.disk = DiskTier(disk_dir, disk_bytes, metrics) if disk_dir is not None else None
        self._lock = threading.RLock()
        self._hits: dict[str, int] = {}
        self._update_gauges()

    def _count(self, tier: str, hit: bool) -> None:
        if self.metrics:
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(tier=tier).inc()

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.cache_bytes.labels(tier="memory").set(self.memory.bytes)

    def get_memory(self, key: str) -> MergedAdapter | None:
        """The memory tier only: counts a memory hit, but a miss is counted by ``get``."""
        with self._lock:
            entry = self.memory.get(key)
            if entry is not None:
                self._count("memory", True)
                self._hits[key] = self._hits.get(key, 0) + 1
            return entry

    def get(self, key: str) -> MergedAdapter | None:
        """Memory, then disk (a disk hit is copied into memory)."""
        entry = self.get_memory(key)
        if entry is not None:
            return entry
        self._count("memory", False)
        if self.disk is None:
            return None
        entry = self.disk.get(key)
        self._count("disk", entry is not None)
        if entry is not None:
            with self._lock:
                self._put_memory(entry)
                self._hits[key] = self._hits.get(key, 0) + 1
        return entry

    def _put_memory(self, entry: MergedAdapter) -> None:
        dropped = self.memory.put(entry)
        if self.metrics and dropped:
            self.metrics.cache_evictions.labels(tier="memory").inc(len(dropped))
        self._forget_hits(dropped, still_in=lambda k: self.disk is not None and self.disk._meta(k).exists())
        self._update_gauges()

    def _forget_hits(self, keys: list[str], still_in: Callable[[str], bool]) -> None:
        """Prune the hit counts of entries gone from every tier (the counter grew without bound)."""
        with self._lock:
            for key in keys:
                if not still_in(key):
                    self._hits.pop(key, None)

    def put(self, entry: MergedAdapter) -> None:
        """Store in both tiers. A disk failure is logged and leaves the memory tier serving."""
        with self._lock:
            self._put_memory(entry)
        if self.disk is not None:
            try:
                dropped = self.disk.put(entry)
            except OSError as e:
                log.warning("disk cache write failed", extra={"merge_key": entry.merge_key, "error": str(e)})
                return
            self._forget_hits(dropped, still_in=lambda k: k in self.memory)
            if self.metrics:
                if dropped:
                    self.metrics.cache_evictions.labels(tier="disk").inc(len(dropped))
                self.metrics.cache_bytes.labels(tier="disk").set(self.disk.total_bytes())

    def contains(self, key: str) -> bool:
        """Whether a lookup would likely hit (the disk entry is not verified here)."""
        with self._lock:
            if key in self.memory:
                return True
        return self.disk is not None and self.disk._meta(key).exists()

    def evict(self, key: str) -> int:
        """Drop ``key`` from both tiers; 1 if it was cached anywhere, else 0."""
        with self._lock:
            found = self.memory.pop(key) is not None
            self._hits.pop(key, None)
            self._update_gauges()
        if self.disk is not None:
            found = self.disk.remove(key) or found
        return int(found)

    def evict_all(self) -> int:
        keys = set(self.memory.list_keys()) | set(self.disk.list_keys() if self.disk else ())
        return sum(self.evict(k) for k in keys)

    def entries(self) -> list[CachedInfo]:
        with self._lock:
            mem = {k: self.memory.peek(k) for k in self.memory.list_keys()}
            hits = dict(self._hits)
        out: dict[str, CachedInfo] = {}
        for key, e in mem.items():
            assert e is not None
            out[key] = CachedInfo(key, e.nbytes, True, False, e.rank, e.base_model, hits.get(key, 0))
        if self.disk is not None:
            for key in self.disk.list_keys():
                meta = self.disk.read_meta(key)
                if meta is None:
                    continue
                prev = out.get(key)
                out[key] = CachedInfo(
                    key,
                    int(meta.get("bytes", 0)),
                    prev is not None,
                    True,
                    int(meta.get("rank", 0)),
                    str(meta.get("base_model", "")),
                    hits.get(key, 0),
                )
        return sorted(out.values(), key=lambda c: c.merge_key)

    @property
    def memory_bytes(self) -> int:
        return self.memory.bytes

    @property
    def memory_limit_bytes(self) -> int:
        return self.memory.limit_bytes

    def disk_usage(self) -> tuple[int, int]:
        """(bytes used, bound); (0, 0) without a disk tier."""
        if self.disk is None:
            return 0, 0
        return self.disk.total_bytes(), self.disk.limit_bytes
