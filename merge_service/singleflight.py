"""Concurrent requests for one merge key share one build.

``begin(key, build)`` returns a Ticket. The first ticket for a key starts the build; the others join
it. Each ticket sees the build's progress events (sent from the build thread with
``loop.call_soon_threadsafe``) and then its result or error::

    with flights.begin(key, build) as ticket:     # build(progress) runs in a worker thread
        async for event in ticket.events():       # Progress(stage, done, total) until the build ends
            ...
        value = await ticket.result()             # the build's value, or its exception re-raised

Builds run in a pool of ``max_concurrent`` threads; up to ``max_queued`` more wait for a slot (0: no
bound), and a new key beyond that is refused with ResourceExhausted at once rather than waiting
without bound; joining a key already building is always allowed (it adds no work). A build belongs to no
single request: a waiter that cancels leaves it running for the others, and when the last waiter
goes the build still finishes (its result is usually cached by the build function, so the work is
not lost). A failed build hands its exception to every waiter and is forgotten, so the next request
retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, NamedTuple, TypeVar

from loramerge.errors import ResourceExhausted, Unavailable
from merge_service.metrics import MergeMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class Progress(NamedTuple):
    stage: str
    done: int
    total: int


ProgressFn = Callable[[str, int, int], None]
_DONE = object()


class _Flight(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[T] = loop.create_future()
        # Retrieve the exception even when no waiter is left, so asyncio does not warn about it.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.queues: set[asyncio.Queue[Any]] = set()
        self.last: Progress | None = None
        self.finished = False

    def publish(self, event: Progress) -> None:
        self.last = event
        for q in self.queues:
            q.put_nowait(event)

    def finish(self) -> None:
        self.finished = True
        for q in self.queues:
            q.put_nowait(_DONE)


class Ticket(Generic[T]):
    """One request's view of a build: its progress events, then its result."""

    def __init__(self, flight: _Flight[T], joined: bool) -> None:
        self._flight = flight
        self.joined = joined  # True when another request had started this build
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        flight.queues.add(self._queue)
        if flight.last is not None:
            self._queue.put_nowait(flight.last)
        if flight.finished:
            self._queue.put_nowait(_DONE)

    async def events(self) -> AsyncIterator[Progress]:
        while True:
            event = await self._queue.get()
            if event is _DONE:
                return
            yield event

    async def result(self) -> T:
        # shield: a cancelled waiter must not cancel the build the others share.
        return await asyncio.shield(self._flight.future)

    def close(self) -> None:
        self._flight.queues.discard(self._queue)

    def __enter__(self) -> Ticket[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SingleFlight(Generic[T]):
    def __init__(self, max_concurrent: int, metrics: MergeMetrics | None = None, max_queued: int = 0) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 (0: no limit), got {max_queued}")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="merge-build")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._flights: dict[str, _Flight[T]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def in_flight(self) -> list[str]:
        return list(self._flights)

    def begin(self, key: str, build: Callable[[ProgressFn], T]) -> Ticket[T]:
        """Join the build running for ``key``, or start ``build`` (a blocking function of a progress
        callback) for it. Call on the event loop. ResourceExhausted when ``key`` is not building and
        max_concurrent builds run with max_queued more waiting."""
        flight = self._flights.get(key)
        if flight is not None:
            if self.metrics:
                self.metrics.singleflight_joins.inc()
            return Ticket(flight, joined=True)
        if self.max_queued and len(self._flights) >= self.max_concurrent + self.max_queued:
            raise ResourceExhausted(
                f"the merge service is busy: {len(self._flights)} merges are running or waiting, its limit "
                f"(max_concurrent_builds {self.max_concurrent} + max_queued_builds {self.max_queued}); "
                "retry later"
            )
        loop = asyncio.get_running_loop()
        flight = _Flight(loop)
        self._flights[key] = flight
        task = loop.create_task(self._execute(key, flight, build), name=f"build-{key[:16]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Ticket(flight, joined=False)

    async def _execute(self, key: str, flight: _Flight[T], build: Callable[[ProgressFn], T]) -> None:
        loop = asyncio.get_running_loop()

        def progress(stage: str, done: int, total: int) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(flight.publish, Progress(stage, int(done), int(total)))

        try:
            if self.metrics:
                self.metrics.builds_waiting.inc()
            try:
                await self._slots.acquire()
            finally:
                if self.metrics:
                    self.metrics.builds_waiting.dec()
            try:
                if self.metrics:
                    self.metrics.builds_in_flight.inc()
                value = await loop.run_in_executor(self._pool, build, progress)
            finally:
                self._slots.release()
                if self.metrics:
                    self.metrics.builds_in_flight.dec()
        except asyncio.CancelledError:
            flight.future.set_exception(Unavailable("the merge service is shutting down; retry"))
            raise
        except BaseException as exc:
            flight.future.set_exception(exc)
        else:
            flight.future.set_result(value)
        finally:
            self._flights.pop(key, None)
            flight.finish()

    async def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for running builds, then cancel what is left."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
