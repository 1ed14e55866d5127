"""The merge cache: memory LRU bounded in bytes, atomic disk tier verified by sha256."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from loramerge.errors import InvalidArgument
from loramerge_common.metrics import sample_value
from merge_service.cache import (
    STALE_TMP_SECONDS,
    TMP_MARK,
    MergeCache,
    atomic_write,
    check_key,
    sha256_hex,
)
from merge_service.merged import MergedAdapter, ModuleStat
from merge_service.metrics import MergeMetrics


def entry(key: str, size: int, fill: bytes = b"x") -> MergedAdapter:
    data = (fill * size)[:size]
    return MergedAdapter(
        merge_key=key,
        config_json='{"r": 8}',
        data=data,
        sha256=sha256_hex(data),
        rank=8,
        modules=(ModuleStat("model.layers.0.self_attn.q_proj", 8, 0.0),),
        base_model="tiny",
        build_seconds=0.5,
    )


def metrics() -> tuple[MergeMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return MergeMetrics(registry), registry


def test_memory_lru_is_bounded_in_bytes() -> None:
    cache = MergeCache(memory_bytes=250)
    for key in ("a1", "b2", "c3"):
        cache.put(entry(key, 100))
    assert cache.memory_bytes == 200
    assert cache.get("a1") is None  # oldest dropped to fit c3
    assert cache.get("b2") is not None  # b2 now most recent
    cache.put(entry("d4", 100))
    assert cache.get("c3") is None
    assert {e.merge_key for e in cache.entries()} == {"b2", "d4"}


def test_entry_larger_than_memory_goes_to_disk_only(tmp_path: Path) -> None:
    cache = MergeCache(memory_bytes=50, disk_dir=tmp_path, disk_bytes=10_000)
    cache.put(entry("big", 100))
    assert cache.memory_bytes == 0
    [info] = cache.entries()
    assert (info.in_memory, info.on_disk, info.bytes) == (False, True, 100)
    got = cache.get("big")
    assert got is not None and got.data == entry("big", 100).data
    assert got.modules == entry("big", 100).modules


def test_disk_survives_a_new_cache_instance(tmp_path: Path) -> None:
    MergeCache(memory_bytes=1000, disk_dir=tmp_path, disk_bytes=10_000).put(entry("k1", 300, b"ab"))
    m, registry = metrics()
    fresh = MergeCache(memory_bytes=1000, disk_dir=tmp_path, disk_bytes=10_000, metrics=m)
    got = fresh.get("k1")
    assert got == entry("k1", 300, b"ab")
    assert sample_value(registry, "loramerge_merge_cache_hits_total", {"tier": "disk"}) == 1
    assert fresh.get("k1") is not None  # now promoted to memory
    assert sample_value(registry, "loramerge_merge_cache_hits_total", {"tier": "memory"}) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "drop_data", "bad_meta"])
def test_disk_corruption_is_a_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    MergeCache(memory_bytes=1000, disk_dir=tmp_path, disk_bytes=10_000).put(entry("k1", 300, b"ab"))
    data, meta = tmp_path / "k1.safetensors", tmp_path / "k1.json"
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[10] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-1])
    elif damage == "drop_data":
        data.unlink()
    else:
        meta.write_text("{not json")
    m, registry = metrics()
    fresh = MergeCache(memory_bytes=1000, disk_dir=tmp_path, disk_bytes=10_000, metrics=m)
    assert fresh.get("k1") is None
    assert sample_value(registry, "loramerge_merge_cache_corrupt_total") == 1
    assert not meta.exists() and not data.exists()


def test_disk_bound_drops_least_recently_used(tmp_path: Path) -> None:
    cache = MergeCache(memory_bytes=0, disk_dir=tmp_path, disk_bytes=2_000)
    cache.put(entry("old", 700))
    cache.put(entry("mid", 700))
    past = time.time() - 100
    for name in ("old.safetensors", "old.json"):
        os.utime(tmp_path / name, (past, past))
    for name in ("mid.safetensors", "mid.json"):
        os.utime(tmp_path / name, (past + 10, past + 10))
    assert cache.get("old") is not None  # a hit refreshes its time: "mid" is now the oldest
    cache.put(entry("new", 700))
    assert sorted(e.merge_key for e in cache.entries()) == ["new", "old"]
    used, limit = cache.disk_usage()
    assert used <= limit == 2_000


def test_no_temporary_files_left_and_stale_ones_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / "zz.safetensors.tmp-pod-a-1"
    stale.write_bytes(b"half")
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = tmp_path / "yy.safetensors.tmp-pod-b-2"  # another pod's write in progress: left alone
    fresh.write_bytes(b"half")
    cache = MergeCache(memory_bytes=1000, disk_dir=tmp_path, disk_bytes=10_000)
    cache.put(entry("k1", 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, "k1.json", "k1.safetensors"])
    assert [e.merge_key for e in cache.entries()] == ["k1"]


def test_temporary_names_differ_across_writers_with_the_same_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names: list[str] = []

    def recording_open(file, *args, **kwargs):
        names.append(Path(file).name)
        return open(file, *args, **kwargs)

    monkeypatch.setattr("merge_service.cache.open", recording_open, raising=False)
    for _ in range(2):
        atomic_write(tmp_path / "k.safetensors", b"data")
    assert len(names) == 2 and names[0] != names[1]
    assert all(TMP_MARK in n and socket.gethostname() in n for n in names)


def test_evict_one_and_all(tmp_path: Path) -> None:
    cache = MergeCache(memory_bytes=1000, disk_dir=tmp_path, disk_bytes=10_000)
    for key in ("k1", "k2", "k3"):
        cache.put(entry(key, 10))
    assert cache.evict("k2") == 1
    assert cache.evict("k2") == 0
    assert cache.get("k2") is None
    assert cache.evict_all() == 2
    assert cache.entries() == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["../etc/passwd", "", "a/b", ".hidden", "x" * 300])
def test_keys_that_are_not_file_names_are_refused(key: str) -> None:
    with pytest.raises(InvalidArgument, match="merge_key"):
        check_key(key)


def test_hit_counts_are_pruned_with_their_entries(tmp_path: Path) -> None:
    """An entry the LRU drops from every tier takes its hit count with it (it used to stay forever)."""
    keys = [f"{i:064x}" for i in range(20)]
    cache = MergeCache(memory_bytes=250)
    for k in keys:
        cache.put(entry(k, 100))
        assert cache.get(k) is not None
    assert set(cache._hits) <= set(cache.memory.list_keys()) and len(cache._hits) <= 2

    tiered = MergeCache(memory_bytes=250, disk_dir=tmp_path, disk_bytes=450)
    for k in keys:
        tiered.put(entry(k, 100))
        assert tiered.get(k) is not None
    cached = {c.merge_key for c in tiered.entries()}
    assert set(tiered._hits) <= cached and len(tiered._hits) <= 4
