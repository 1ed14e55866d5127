"""Remembered spec -> merge key pairs expire: after the TTL the merge service's Plan confirms the key.

Fake engine, fake merge service and a fake clock; tests/service/test_inference_spec_ttl.py runs the
same against the real merge service with an adapter folder whose files change.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from inference_service.metrics import InferenceMetrics
from inference_service.registry import AdapterRegistry
from inference_service.request_specs import ref_pinned, spec_pinned
from loramerge.errors import DeadlineExceeded, NotFound, PermissionDenied, Unavailable
from loramerge.v1 import merge_pb2 as M
from loramerge_common.metrics import sample_value
from tests.unit.test_inference_registry import LIMITS, FakeEngine, FakeMergeService, spec

TTL = 60.0
SHA = "0123456789abcdef0123456789abcdef01234567"
HUB, LOCAL, S3 = M.AdapterSource.HUB, M.AdapterSource.LOCAL, M.AdapterSource.S3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, ttl: float = TTL):
    engine, merges, clock = FakeEngine(), FakeMergeService(), Clock()
    metrics = InferenceMetrics(CollectorRegistry())
    registry = AdapterRegistry(
        engine,
        merges,
        adapter_dir=tmp_path / "adapters",
        limits=LIMITS,
        max_loaded=4,
        spec_ttl=ttl,
        metrics=metrics,
        clock=clock,
    )
    return registry, engine, merges, clock, metrics


async def use(registry: AdapterRegistry, s: M.MergeSpec):
    async with await registry.for_spec(s) as usage:
        return usage


def rechecks(metrics: InferenceMetrics, result: str) -> float:
    return sample_value(metrics.registry, "loramerge_inference_spec_rechecks_total", {"result": result})


def test_before_the_ttl_a_repeated_spec_asks_nothing(tmp_path):
    async def main():
        registry, _, merges, clock, _ = make(tmp_path)
        first = await use(registry, spec("a"))
        clock.now += TTL - 0.5
        again = await use(registry, spec("a"))
        assert again.already_loaded and again.entry is first.entry
        assert merges.calls == 1 and merges.plan_calls == 0

    asyncio.run(main())


def test_after_the_ttl_an_unchanged_key_keeps_the_loaded_adapter(tmp_path):
    async def main():
        registry, engine, merges, clock, metrics = make(tmp_path)
        first = await use(registry, spec("a"))
        clock.now += TTL
        again = await use(registry, spec("a"))
        assert again.already_loaded and again.entry is first.entry
        assert merges.plan_calls == 1 and merges.calls == 1 and len(engine.loaded) == 1
        clock.now += TTL - 0.5  # confirmed just now: the next check is a full TTL later
        await use(registry, spec("a"))
        assert merges.plan_calls == 1
        clock.now += 0.5
        await use(registry, spec("a"))
        assert merges.plan_calls == 2 and merges.calls == 1
        assert rechecks(metrics, "same") == 2

    asyncio.run(main())


def test_after_the_ttl_a_new_key_is_fetched_as_for_a_new_spec(tmp_path):
    async def main():
        registry, engine, merges, clock, metrics = make(tmp_path)
        old = await use(registry, spec("a"))
        merges.keys["a"] = "a-v2"  # the adapter's files changed
        clock.now += TTL - 1
        assert (await use(registry, spec("a"))).entry is old.entry  # not yet
        clock.now += 1
        new = await use(registry, spec("a"))
        assert new.entry.merge_key == "a-v2" and not new.already_loaded
        assert new.entry.lora_int_id != old.entry.lora_int_id and new.entry.path != old.entry.path
        assert merges.plan_calls == 1 and merges.calls == 2 and len(engine.loaded) == 2
        assert rechecks(metrics, "changed") == 1
        clock.now += 1
        assert (await use(registry, spec("a"))).entry is new.entry and merges.calls == 2
        # The old adapter stays registered until LRU eviction (another spec may still map to it).
        assert {e.merge_key for e in registry.entries()} == {"a", "a-v2"}

    asyncio.run(main())


def test_a_key_that_changed_to_an_adapter_already_loaded_is_served_without_a_merge(tmp_path):
    async def main():
        registry, _, merges, clock, _ = make(tmp_path)
        other = await use(registry, spec("b"))
        await use(registry, spec("a"))
        merges.keys["a"] = "b"  # a's folder now holds b's files
        clock.now += TTL
        usage = await use(registry, spec("a"))
        assert usage.entry is other.entry and usage.already_loaded and merges.calls == 2

    asyncio.run(main())


@pytest.mark.parametrize(
    "error",
    [Unavailable("merge service down"), DeadlineExceeded("no answer within 2.0 s")],
    ids=["unavailable", "deadline"],
)
def test_a_merge_service_that_cannot_answer_leaves_the_loaded_adapter_serving(tmp_path, error, caplog):
    async def main():
        registry, _, merges, clock, metrics = make(tmp_path)
        first = await use(registry, spec("a"))
        merges.plan_fail_with = error
        clock.now += TTL
        with caplog.at_level("WARNING", logger="inference_service.registry"):
            stale = await use(registry, spec("a"))
        assert stale.entry is first.entry and stale.already_loaded
        assert merges.plan_calls == 1 and merges.calls == 1 and rechecks(metrics, "unreachable") == 1
        assert "serving the loaded adapter" in caplog.text
        clock.now += 1  # not asked again on every request while it is down
        await use(registry, spec("a"))
        assert merges.plan_calls == 1
        merges.plan_fail_with = None
        merges.keys["a"] = "a-v2"
        clock.now += TTL
        assert (await use(registry, spec("a"))).entry.merge_key == "a-v2"

    asyncio.run(main())


@pytest.mark.parametrize(
    "error",
    [NotFound("adapter 'a' not found", field="spec.adapters[0].id"), PermissionDenied("gated repo")],
    ids=["not-found", "permission-denied"],
)
def test_a_spec_that_no_longer_resolves_fails_as_a_new_request_would(tmp_path, error):
    async def main():
        registry, _, merges, clock, metrics = make(tmp_path)
        await use(registry, spec("a"))
        merges.plan_fail_with = error
        clock.now += TTL
        with pytest.raises(type(error)):
            await use(registry, spec("a"))
        assert rechecks(metrics, "failed") == 1 and merges.calls == 1
        merges.plan_fail_with = None  # forgotten: the next request asks Merge, as for a new spec
        usage = await use(registry, spec("a"))
        assert merges.calls == 2 and usage.already_loaded  # same key: the loaded adapter, no add_lora

    asyncio.run(main())


def test_concurrent_requests_after_the_ttl_share_one_plan_call(tmp_path):
    async def main():
        registry, _, merges, clock, _ = make(tmp_path)
        await use(registry, spec("a"))
        clock.now += TTL
        merges.plan_gate = asyncio.Event()
        merges.keys["a"] = "a-v2"
        waiters = [asyncio.create_task(use(registry, spec("a"))) for _ in range(5)]
        await asyncio.sleep(0.01)
        merges.plan_gate.set()
        usages = await asyncio.gather(*waiters)
        assert merges.plan_calls == 1 and merges.calls == 2
        assert {u.entry.merge_key for u in usages} == {"a-v2"}

    asyncio.run(main())


def test_ttl_zero_never_rechecks(tmp_path):
    async def main():
        registry, _, merges, clock, _ = make(tmp_path, ttl=0)
        await use(registry, spec("a"))
        clock.now += 10 * 365 * 86400
        await use(registry, spec("a"))
        assert merges.plan_calls == 0 and merges.calls == 1

    asyncio.run(main())


@pytest.mark.parametrize(
    "ref",
    [
        M.AdapterRef(id="org/x", revision=SHA),
        M.AdapterRef(id="org/x", source=HUB, revision=SHA),
        M.AdapterRef(id=f"org/x@{SHA}", source=HUB),
        M.AdapterRef(id="s3://bucket/x", revision="v1,v2"),
        M.AdapterRef(id="x", source=S3, revision="v1,v2"),
    ],
    ids=["hub-commit", "hub-commit-explicit", "hub-inline-commit", "s3-revision", "s3-explicit"],
)
def test_pinned_specs_are_never_rechecked(tmp_path, ref):
    async def main():
        registry, _, merges, clock, _ = make(tmp_path)
        s = M.MergeSpec(adapters=[ref, M.AdapterRef(id="org/y", revision=SHA)])
        assert spec_pinned(s)
        await use(registry, s)
        clock.now += 100 * TTL
        await use(registry, s)
        assert merges.plan_calls == 0 and merges.calls == 1

    asyncio.run(main())


@pytest.mark.parametrize(
    "ref",
    [
        M.AdapterRef(id="org/x"),  # default branch
        M.AdapterRef(id="org/x", revision="main"),
        M.AdapterRef(id="org/x", revision="v1.0"),
        M.AdapterRef(id="org/x", revision=SHA[:12]),  # a short sha may be a branch or tag name too
        M.AdapterRef(id="org/x", revision=SHA.upper()),
        M.AdapterRef(id=f"org/x@{SHA}"),  # source unspecified: could be a local folder of that name
        M.AdapterRef(id="local/x", source=LOCAL),
        M.AdapterRef(id="s3://bucket/x"),
    ],
    ids=["default", "branch", "tag", "short-sha", "upper-sha", "inline-auto", "local", "s3-latest"],
)
def test_what_can_change_is_not_pinned(ref):
    assert not ref_pinned(ref)
    # one changeable adapter makes the whole spec changeable
    assert not spec_pinned(M.MergeSpec(adapters=[M.AdapterRef(id="org/y", revision=SHA), ref]))


def test_a_spec_with_a_changeable_adapter_is_rechecked(tmp_path):
    async def main():
        registry, _, merges, clock, _ = make(tmp_path)
        s = M.MergeSpec(adapters=[M.AdapterRef(id="org/x", revision=SHA), M.AdapterRef(id="org/y")])
        await use(registry, s)
        clock.now += TTL
        await use(registry, s)
        assert merges.plan_calls == 1

    asyncio.run(main())


def test_abandon_fails_waiting_and_later_requests_with_its_error(tmp_path):
    async def main():
        registry, engine, merges, _, _ = make(tmp_path)
        merges.gate = asyncio.Event()
        waiters = [asyncio.create_task(use(registry, spec("a"))) for _ in range(3)]
        await asyncio.sleep(0.01)
        registry.abandon(Unavailable("the vLLM engine has died"))
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results), results
        with pytest.raises(Unavailable, match="engine has died"):
            await registry.for_spec(spec("b"))
        assert engine.loaded == {} and list(registry.adapter_dir.iterdir()) == []

    asyncio.run(main())


def test_a_waiter_cancelled_by_its_own_caller_is_cancelled_not_failed(tmp_path):
    async def main():
        registry, _, merges, _, _ = make(tmp_path)
        merges.gate = asyncio.Event()
        waiter = asyncio.create_task(use(registry, spec("a")))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        merges.gate.set()

    asyncio.run(main())


def test_a_negative_ttl_is_refused(tmp_path):
    with pytest.raises(Exception, match=r"spec_ttl_seconds must be >= 0, got -1"):
        AdapterRegistry(
            FakeEngine(), FakeMergeService(), adapter_dir=tmp_path, limits=LIMITS, max_loaded=2, spec_ttl=-1
        )
