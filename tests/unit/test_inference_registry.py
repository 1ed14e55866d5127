"""The adapter registry with a fake engine and a fake merge service: single flight, LRU, leases.

The real engine and merge service are exercised in tests/e2e/test_inference_e2e.py; here the
point is the bookkeeping: what is fetched, registered, evicted and removed from disk, and when.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from inference_service.merge_client import Fetched
from inference_service.metrics import InferenceMetrics
from inference_service.receiver import AdapterLimits, AdapterWriter, Received
from inference_service.registry import AdapterRegistry, pushed_key
from loramerge.errors import DeadlineExceeded, InvalidArgument, LoramergeError, Unavailable
from loramerge.v1 import merge_pb2 as M
from loramerge_common.metrics import sample_value

LIMITS = AdapterLimits(base_model="base", max_rank=16, max_bytes=10_000)


class FakeEngine:
    def __init__(self) -> None:
        self.loaded: dict[int, Path] = {}
        self.reject: set[str] = set()  # merge keys whose add_lora fails

    async def add_lora(self, name: str, lora_int_id: int, path: Path) -> None:
        assert lora_int_id not in self.loaded, "lora_int_id reused"
        assert (path / "adapter_model.safetensors").exists()
        if any(name.startswith(k[:16]) for k in self.reject):
            raise InvalidArgument(f"vLLM rejected adapter {name}: bad tensors", field="adapter")
        self.loaded[lora_int_id] = path

    async def remove_lora(self, lora_int_id: int) -> None:
        self.loaded.pop(lora_int_id)


class FakeMergeService:
    """Streams a tiny adapter whose merge key is the first adapter id (or what ``keys`` maps it to)."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail_with: Exception | None = None
        self.keys: dict[str, str] = {}
        self.plan_calls = 0
        self.plan_gate: asyncio.Event | None = None
        self.plan_fail_with: Exception | None = None
        self.progress: list[M.MergeProgress] = []  # sent to on_progress before the gate

    async def plan(self, spec: M.MergeSpec, *, deadline: float, field_namer=None) -> str:
        self.plan_calls += 1
        if self.plan_gate is not None:
            await self.plan_gate.wait()
        if self.plan_fail_with is not None:
            raise self.plan_fail_with
        return self.keys.get(spec.adapters[0].id, spec.adapters[0].id)

    async def fetch(
        self, spec: M.MergeSpec, writer: AdapterWriter, *, deadline: float, field_namer=None, on_progress=None
    ) -> Fetched:
        self.calls += 1
        for event in self.progress:
            if on_progress is not None:
                on_progress(event)
            await asyncio.sleep(0)
        if self.gate is not None:
            try:  # like the real fetcher: bounded by the deadline it was given
                await asyncio.wait_for(self.gate.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise DeadlineExceeded("deadline exceeded", field="spec") from None
        if self.fail_with is not None:
            raise self.fail_with
        key = self.keys.get(spec.adapters[0].id, spec.adapters[0].id)
        data = key.encode() * 10
        writer.start(
            M.MergeHeader(
                merge_key=key,
                adapter_config_json=json.dumps({"r": 4, "base_model_name_or_path": "base"}),
                total_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                base_model="base",
                rank=4,
            )
        )
        writer.write(M.DataChunk(offset=0, data=data))
        writer.finish(None)
        assert writer.header is not None
        received = Received(writer.header, writer.config, writer.directory, len(data), 1.0, 2.0)
        return Fetched(received=received, attempts=1, resumed=0)


def spec(name: str, weight: float = 1.0) -> M.MergeSpec:
    return M.MergeSpec(adapters=[M.AdapterRef(id=name, weight=weight)])


def make(tmp_path: Path, max_loaded: int = 3):
    engine, merges = FakeEngine(), FakeMergeService()
    metrics = InferenceMetrics(CollectorRegistry())
    registry = AdapterRegistry(
        engine,
        merges,
        adapter_dir=tmp_path / "adapters",
        limits=LIMITS,
        max_loaded=max_loaded,
        metrics=metrics,
    )
    return registry, engine, merges, metrics


def folders(registry: AdapterRegistry) -> int:
    return len(list(registry.adapter_dir.iterdir()))


def lookups(metrics: InferenceMetrics, result: str) -> float:
    return sample_value(metrics.registry, "loramerge_inference_adapter_lookups_total", {"result": result})


def test_concurrent_requests_for_a_new_spec_share_one_fetch(tmp_path):
    async def main():
        registry, engine, merges, metrics = make(tmp_path)
        merges.gate = asyncio.Event()
        waiters = [asyncio.create_task(registry.for_spec(spec("a"))) for _ in range(5)]
        await asyncio.sleep(0.01)
        merges.gate.set()
        leases = await asyncio.gather(*waiters)
        assert merges.calls == 1 and len(engine.loaded) == 1
        assert {lease.usage.entry.lora_int_id for lease in leases} == {2}
        assert lookups(metrics, "fetched") == 1 and lookups(metrics, "joined") == 4
        for lease in leases:
            await lease.__aexit__(None, None, None)
        async with await registry.for_spec(spec("a")) as usage:  # repeated: no fetch
            assert usage.already_loaded and merges.calls == 1
        assert lookups(metrics, "loaded") == 1

    asyncio.run(main())


def test_a_caller_going_away_does_not_cancel_the_shared_fetch(tmp_path):
    async def main():
        registry, engine, merges, _ = make(tmp_path)
        merges.gate = asyncio.Event()
        first = asyncio.create_task(registry.for_spec(spec("a")))
        second = asyncio.create_task(registry.for_spec(spec("a")))
        await asyncio.sleep(0.01)
        first.cancel()
        merges.gate.set()
        lease = await second
        assert lease.usage.entry.merge_key == "a" and merges.calls == 1 and len(engine.loaded) == 1

    asyncio.run(main())


def test_least_recently_used_idle_adapters_are_evicted_from_engine_and_disk(tmp_path):
    async def main():
        registry, engine, _, metrics = make(tmp_path, max_loaded=2)
        for name in ("a", "b"):
            async with await registry.for_spec(spec(name)):
                pass
        async with await registry.for_spec(spec("a")):  # a is now the most recently used
            pass
        held = await registry.for_spec(spec("b"))  # b is in use: never evicted
        async with await registry.for_spec(spec("c")):
            pass
        assert {e.merge_key for e in registry.entries()} == {"b", "c"}
        assert len(engine.loaded) == 2 and folders(registry) == 2
        assert (
            sample_value(metrics.registry, "loramerge_inference_adapter_evictions_total", {"reason": "lru"})
            == 1
        )
        await held.__aexit__(None, None, None)

    asyncio.run(main())


def test_adapters_in_use_are_kept_even_over_the_bound(tmp_path):
    async def main():
        registry, engine, _, _ = make(tmp_path, max_loaded=1)
        held = await registry.for_spec(spec("a"))
        async with await registry.for_spec(spec("b")):
            assert {e.merge_key for e in registry.entries()} == {"a", "b"}
        await held.__aexit__(None, None, None)
        async with await registry.for_spec(spec("c")):
            pass
        assert [e.merge_key for e in registry.entries()] == ["c"] and len(engine.loaded) == 1

    asyncio.run(main())


def test_unload_while_in_use_waits_for_the_last_request(tmp_path):
    async def main():
        registry, engine, _, _ = make(tmp_path)
        lease = await registry.for_spec(spec("a"))
        assert await registry.unload(merge_key="a")
        assert registry.entries() == [] and len(engine.loaded) == 1 and folders(registry) == 1
        await lease.__aexit__(None, None, None)
        assert engine.loaded == {} and folders(registry) == 0
        assert not await registry.unload(merge_key="a")

    asyncio.run(main())


def test_a_rejected_adapter_leaves_nothing_behind_and_evicts_nothing(tmp_path):
    async def main():
        registry, engine, merges, _ = make(tmp_path, max_loaded=1)
        async with await registry.for_spec(spec("a")):
            pass
        engine.reject.add("bad")
        with pytest.raises(InvalidArgument, match="bad tensors"):
            await registry.for_spec(spec("bad"))
        assert [e.merge_key for e in registry.entries()] == ["a"] and folders(registry) == 1
        merges.fail_with = Unavailable("merge service down")
        with pytest.raises(Unavailable):
            await registry.for_spec(spec("other"))
        assert folders(registry) == 1
        merges.fail_with = None
        async with await registry.for_spec(spec("other")) as usage:  # a failed fetch is not remembered
            assert not usage.already_loaded

    asyncio.run(main())


def test_two_spellings_of_one_merge_share_one_adapter(tmp_path):
    async def main():
        registry, engine, merges, _ = make(tmp_path)
        merges.keys = {"x": "same", "y": "same"}
        async with await registry.for_spec(spec("x")) as first:
            pass
        async with await registry.for_spec(spec("y")) as second:
            pass
        assert merges.calls == 2 and len(engine.loaded) == 1 and folders(registry) == 1
        assert second.already_loaded and second.entry is first.entry

    asyncio.run(main())


def test_lora_int_ids_are_never_reused(tmp_path):
    async def main():
        registry, _, _, _ = make(tmp_path, max_loaded=1)
        ids = []
        for name in ("a", "b", "a", "b"):
            async with await registry.for_spec(spec(name)) as usage:
                ids.append(usage.entry.lora_int_id)
        assert len(set(ids)) == 4

    asyncio.run(main())


def test_merge_key_lookups(tmp_path):
    async def main():
        registry, *_ = make(tmp_path)
        async with await registry.for_spec(spec("a")):
            pass
        async with registry.for_key("a") as usage:
            assert usage.already_loaded
        with pytest.raises(Exception, match="merge_key 'zzz' is not loaded"):
            registry.for_key("zzz")

    asyncio.run(main())


def evictions(metrics: InferenceMetrics) -> float:
    return sample_value(metrics.registry, "loramerge_inference_adapter_evictions_total", {"reason": "lru"})


def test_releasing_leases_shrinks_a_registry_left_over_its_bound(tmp_path):
    """Every adapter in use: the registry goes over its bound; the releases bring it back (no new
    load needed), evicting the least recently used idle adapters from the engine and the disk."""

    async def main():
        registry, engine, _, metrics = make(tmp_path, max_loaded=2)
        leases = [await registry.for_spec(spec(name)) for name in ("a", "b", "c")]
        assert len(registry.entries()) == 3 and evictions(metrics) == 0
        for lease in leases:
            await lease.__aexit__(None, None, None)
        assert [e.merge_key for e in registry.entries()] == ["b", "c"]
        assert len(engine.loaded) == 2 and folders(registry) == 2 and evictions(metrics) == 1

    asyncio.run(main())


P = pushed_key(hashlib.sha256(b"p" * 10).hexdigest())  # what pushed("p") is filed under


async def pushed(key: str):
    """A LoadAdapter stream (Merge chunk format) of a tiny adapter with merge key ``key``."""
    data = key.encode() * 10
    digest = hashlib.sha256(data).hexdigest()
    config = json.dumps({"r": 4, "base_model_name_or_path": "base"})
    yield M.MergeChunk(
        header=M.MergeHeader(
            merge_key=key, adapter_config_json=config, total_bytes=len(data), sha256=digest, rank=4
        )
    )
    yield M.MergeChunk(data=M.DataChunk(offset=0, data=data))
    yield M.MergeChunk(trailer=M.MergeTrailer(total_bytes=len(data), sha256=digest))


def test_a_release_spares_adapters_not_used_yet(tmp_path):
    """A release evicts only adapters that served a request: one just registered (its requests are about
    to lease it) stays, even when it is the least recently used; the next load evicts it as usual."""

    async def main():
        registry, engine, _, _ = make(tmp_path, max_loaded=1)
        first = await registry.for_spec(spec("a"))
        await registry.load_pushed(pushed("p"))  # a is in use: over the bound
        second = await registry.for_spec(spec("a"))  # a is the most recently used now
        assert [e.merge_key for e in registry.entries()] == [P, "a"]
        await first.__aexit__(None, None, None)  # a still held, p never used: nothing to evict
        assert [e.merge_key for e in registry.entries()] == [P, "a"]
        await second.__aexit__(None, None, None)
        assert [e.merge_key for e in registry.entries()] == [P] and len(engine.loaded) == 1
        async with await registry.for_spec(spec("b")):
            pass
        assert [e.merge_key for e in registry.entries()] == ["b"] and folders(registry) == 1

    asyncio.run(main())


def test_a_pushed_adapter_cannot_impersonate_a_merge(tmp_path):
    """A push claiming the merge key of a spec is filed under its own content key; the spec still gets
    the merge service's adapter, and the pushed one is served only by its pushed key or name."""

    async def main():
        registry, _, merges, _ = make(tmp_path)
        forged = await registry.load_pushed(pushed("a"))  # "a" is the key the merge service gives spec a
        assert forged.entry.merge_key == pushed_key(hashlib.sha256(b"a" * 10).hexdigest())
        assert forged.entry.name.startswith("pushed-")
        async with await registry.for_spec(spec("a")) as lease:
            assert lease.entry.merge_key == "a" and lease.entry is not forged.entry
            assert not lease.already_loaded and merges.calls == 1
        with pytest.raises(Exception, match="is not loaded"):
            registry.for_key(hashlib.sha256(b"a" * 10).hexdigest())  # the bare digest is no key either
        async with registry.for_key(forged.entry.merge_key) as lease:
            assert lease.entry is forged.entry
        assert registry.get(name=forged.entry.name) is forged.entry

    asyncio.run(main())


def test_a_merge_key_in_the_pushed_namespace_is_a_server_fault(tmp_path):
    async def main():
        registry, _, merges, _ = make(tmp_path)
        merges.keys["x"] = "pushed:" + "0" * 64
        with pytest.raises(LoramergeError) as info:
            await registry.for_spec(spec("x"))
        assert info.value.code == grpc.StatusCode.INTERNAL and info.value.field == "header.merge_key"
        assert folders(registry) == 0

    asyncio.run(main())


def test_joiners_keep_their_own_deadline_and_field_names(tmp_path):
    """A joiner of a single-flight fetch is bounded by its own deadline, not the first caller's: the
    first caller's short deadline fails only the first caller, and the joiner fetches again. Each
    caller's error names fields its own way."""

    async def main():
        registry, _, merges, _ = make(tmp_path)
        merges.gate = asyncio.Event()
        now = time.monotonic()
        first = asyncio.create_task(registry.for_spec(spec("a"), deadline=now + 0.2))
        await asyncio.sleep(0.05)
        joiner = asyncio.create_task(registry.for_spec(spec("a"), deadline=now + 30))
        with pytest.raises(DeadlineExceeded):
            await first
        await asyncio.sleep(0.1)
        assert not joiner.done()
        merges.gate.set()
        async with await joiner as usage:
            assert usage.entry.merge_key == "a"

        merges.fail_with = InvalidArgument("spec.density must be in (0, 1]", field="spec.density")
        merges.gate = asyncio.Event()
        mine = asyncio.create_task(registry.for_spec(spec("b")))
        await asyncio.sleep(0.05)
        theirs = asyncio.create_task(
            registry.for_spec(spec("b"), field_namer=lambda f: f.replace("spec", "recipe", 1))
        )
        await asyncio.sleep(0.05)
        merges.gate.set()
        with pytest.raises(InvalidArgument) as a:
            await mine
        with pytest.raises(InvalidArgument) as b:
            await theirs
        assert a.value.field == "merged_adapters.density" and "merged_adapters.density" in a.value.message
        assert b.value.field == "recipe.density" and "recipe.density" in b.value.message

    asyncio.run(main())
