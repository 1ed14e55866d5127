"""grpc.health.v1 status for a server: one entry per service plus the overall "" entry."""

from __future__ import annotations

from collections.abc import Iterable

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Serving status of ``services`` (full names, e.g. "loramerge.v1.MergeService") and "".

    ``set_serving(False)`` before the server is ready (e.g. while a model loads) and ``set_serving(True)``
    after; ``drain()`` marks everything NOT_SERVING for good (graceful shutdown)."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services = ("", *services)
        self.servicer = HealthServicer()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        """One service (or, with None, every service and the overall entry)."""
        status = SERVING if serving else NOT_SERVING
        for name in self.services if service is None else (service,):
            await self.servicer.set(name, status)

    async def drain(self) -> None:
        await self.servicer.enter_graceful_shutdown()

    def status(self, service: str = "") -> int | None:
        return self.servicer._server_status.get(service)
