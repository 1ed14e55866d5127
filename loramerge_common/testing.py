"""Run an asyncio gRPC server on a background thread, for synchronous tests and benchmarks.

async def make() -> GrpcServer:             # runs on the server's own event loop
    server = GrpcServer(settings, services)
    await server.start()
    return server

with ServerThread(make) as server:          # a started GrpcServer
    channel = grpc.insecure_channel(server.address)
    ...                                      # on exit: server.stop(grace=0), loop closed
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

S = TypeVar("S")
R = TypeVar("R")


class ServerThread(Generic[S]):
    """An event loop on a daemon thread that owns one server made by ``make``."""

    def __init__(self, make: Callable[[], Awaitable[S]], *, stop_grace: float = 0.0) -> None:
        self._make = make
        self._stop_grace = stop_grace
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="grpc-server-loop", daemon=True)
        self.server: S | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self, timeout: float = 60.0) -> S:
        self._thread.start()
        self.server = self.call(self._make(), timeout=timeout)  # type: ignore[arg-type]
        return self.server

    def call(self, coro: Coroutine[Any, Any, R], timeout: float | None = 60.0) -> R:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None and hasattr(self.server, "stop"):
            self.call(self.server.stop(self._stop_grace if grace is None else grace))  # type: ignore[attr-defined]
            self.server = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()

    def __enter__(self) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
