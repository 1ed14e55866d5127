"""Single flight for asyncio: one task per key at a time, shared by every caller that asks meanwhile.

The adapter registry uses it for fetches (by spec fingerprint) and the spec memory for re-checks
(one Plan call per spec). What it guarantees:

- the work is started once per key while a task for it runs; the key is free again once it ends
  (nothing is cached here: the result lives where the work put it);
- every waiter waits within its own timeout, shielded: one caller going away (cancelled or out of
  time) never cancels the work the others wait for;
- the work may publish events (merge progress); each waiter gets them while it waits, starting
  with the latest one published before it joined;
- ``abandon(error)`` cancels every task and fails its waiters with ``error`` (a waiter cancelled by
  its own caller stays cancelled).

The work runs with no knowledge of who waits: it gets its parameters (deadline, field names) from
whoever started it, and waiters apply their own (a joiner's deadline and error field names are its
own: see AdapterRegistry.for_spec).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
Listener = Callable[[object], None]


class Flight(Generic[T]):
    """One running piece of work: its task, the latest event it published, who listens."""

    def __init__(self) -> None:
        self.task: asyncio.Task[T]
        self.last_event: object | None = None
        self._listeners: list[Listener] = []

    def publish(self, event: object) -> None:
        self.last_event = event
        for listener in list(self._listeners):
            listener(event)

    def done(self) -> bool:
        return self.task.done()

    def failure(self) -> BaseException | None:
        """The task's exception when it has ended with one (not cancelled), else None."""
        if self.task.done() and not self.task.cancelled():
            return self.task.exception()
        return None


class SingleFlight(Generic[K, T]):
    def __init__(self) -> None:
        self._flights: dict[K, Flight[T]] = {}
        self.abandoned: BaseException | None = None

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def get(self, key: K) -> Flight[T] | None:
        return self._flights.get(key)

    def start(
        self, key: K, work: Callable[[Callable[[object], None]], Awaitable[T]]
    ) -> tuple[Flight[T], bool]:
        """The flight running for ``key``, started now with ``work(publish)`` if there is none;
        and whether this call started it."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        flight = Flight()

        async def run() -> T:
            return await work(flight.publish)

        flight.task = asyncio.get_running_loop().create_task(run())
        self._flights[key] = flight
        flight.task.add_done_callback(lambda task: self._done(key, flight))
        return flight, True

    async def wait(
        self, flight: Flight[T], timeout: float | None = None, on_event: Listener | None = None
    ) -> T:
        """The flight's result, waited for at most ``timeout`` seconds (TimeoutError after that; the
        work goes on). ``on_event`` gets the flight's events meanwhile."""
        if on_event is not None:
            if flight.last_event is not None:
                on_event(flight.last_event)
            flight._listeners.append(on_event)
        try:
            if timeout is None:
                return await self._join(flight)
            return await asyncio.wait_for(self._join(flight), max(0.0, timeout))
        finally:
            if on_event is not None:
                flight._listeners.remove(on_event)

    def abandon(self, error: BaseException) -> None:
        """Cancel every flight; their waiters (and ``abandoned`` readers) get ``error``."""
        self.abandoned = error
        self.cancel_all()

    def cancel_all(self) -> None:
        for flight in list(self._flights.values()):
            flight.task.cancel()

    async def _join(self, flight: Flight[T]) -> T:
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self.abandoned is not None and flight.task.cancelled() and not (me and me.cancelling()):
                raise self.abandoned from None
            raise

    def _done(self, key: K, flight: Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved here: every waiter may have gone away before it failed
