"""Single-flight: one build per key at a time, shared by every waiter, errors to all, nothing kept."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry

from loramerge.errors import NotFound, ResourceExhausted
from loramerge_common.metrics import sample_value
from merge_service.metrics import MergeMetrics
from merge_service.singleflight import Progress, SingleFlight


def test_concurrent_requests_share_one_build_and_see_progress() -> None:
    calls = []
    release = threading.Event()

    def build(progress) -> str:
        calls.append(threading.current_thread().name)
        progress("merge", 1, 2)
        release.wait(10)
        progress("merge", 2, 2)
        return "built"

    async def waiter(sf: SingleFlight[str]) -> tuple[str, list[Progress], bool]:
        with sf.begin("k", build) as ticket:
            events = [e async for e in ticket.events()]
            return await ticket.result(), events, ticket.joined

    async def main() -> None:
        registry = CollectorRegistry()
        sf: SingleFlight[str] = SingleFlight(2, MergeMetrics(registry))
        tasks = [asyncio.create_task(waiter(sf)) for _ in range(16)]
        await asyncio.sleep(0.1)
        assert sf.in_flight() == ["k"]
        assert sample_value(registry, "loramerge_merge_builds_in_flight") == 1
        release.set()
        results = await asyncio.gather(*tasks)
        assert len(calls) == 1
        assert all(r == "built" for r, _, _ in results)
        assert sum(not joined for _, _, joined in results) == 1
        for _, events, _ in results:
            assert events[-1] == Progress("merge", 2, 2)
        assert sample_value(registry, "loramerge_merge_singleflight_joins_total") == 15
        assert sf.in_flight() == []
        await sf.close()

    asyncio.run(main())


def test_failure_reaches_every_waiter_and_the_next_request_retries() -> None:
    attempts = []

    def failing(progress) -> str:
        attempts.append(1)
        raise NotFound("adapter 'x' not found", field="spec.adapters[0].id")

    async def main() -> None:
        sf: SingleFlight[str] = SingleFlight(1)
        tickets = [sf.begin("k", failing) for _ in range(3)]
        for t in tickets:
            with pytest.raises(NotFound, match="'x'"):
                await t.result()
        assert len(attempts) == 1
        assert (await sf.begin("k", lambda p: "ok").result()) == "ok"  # nothing kept from the failure
        await sf.close()

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_cancel_the_shared_build() -> None:
    release = threading.Event()

    def build(progress) -> str:
        release.wait(10)
        return "done"

    async def main() -> None:
        sf: SingleFlight[str] = SingleFlight(1)
        first, second = sf.begin("k", build), sf.begin("k", build)
        quitter = asyncio.create_task(first.result())
        await asyncio.sleep(0.05)
        quitter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitter
        release.set()
        assert await second.result() == "done"
        await sf.close()

    asyncio.run(main())


def test_builds_are_bounded_by_max_concurrent() -> None:
    running, peak = [0], [0]
    lock = threading.Lock()

    def build(progress) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return 1

    async def main() -> None:
        sf: SingleFlight[int] = SingleFlight(2)
        assert sum(await asyncio.gather(*(sf.begin(f"k{i}", build).result() for i in range(6)))) == 6
        await sf.close()

    asyncio.run(main())
    assert 1 <= peak[0] <= 2


def test_new_keys_beyond_running_and_queued_capacity_are_refused_joiners_are_not() -> None:
    release = threading.Event()

    def build(progress) -> str:
        release.wait(10)
        return "built"

    async def main() -> None:
        sf: SingleFlight[str] = SingleFlight(1, max_queued=2)
        tickets = [sf.begin(f"k{i}", build) for i in range(3)]  # one running, two waiting
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted) as info:
            sf.begin("k3", build)
        assert "max_concurrent_builds 1 + max_queued_builds 2" in info.value.message
        assert "3 merges are running or waiting" in info.value.message
        assert sorted(sf.in_flight()) == ["k0", "k1", "k2"]  # the refused key left nothing behind
        joiners = [sf.begin(f"k{i}", build) for i in (0, 2)]  # joining adds no work: always allowed
        assert all(t.joined for t in joiners)
        release.set()
        assert [await t.result() for t in tickets + joiners] == ["built"] * 5
        assert await sf.begin("k3", build).result() == "built"  # room again
        await sf.close()

    asyncio.run(main())


def test_max_queued_zero_leaves_the_queue_unbounded() -> None:
    release = threading.Event()

    def build(progress) -> int:
        release.wait(10)
        return 1

    async def main() -> None:
        sf: SingleFlight[int] = SingleFlight(1, max_queued=0)
        tickets = [sf.begin(f"k{i}", build) for i in range(40)]
        release.set()
        assert sum([await t.result() for t in tickets]) == 40
        await sf.close()

    asyncio.run(main())
    with pytest.raises(ValueError, match="max_queued must be >= 0"):
        SingleFlight(1, max_queued=-1)
