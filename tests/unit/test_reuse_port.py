"""``reuse_port``: a replacement process binds the gRPC and HTTP ports of the one it replaces (a
rolling restart on one host); without it a second bind of a port in use fails, as before."""

from __future__ import annotations

import asyncio

import pytest

from inference_service.dataplane import DataPlane
from inference_service.http_server import HttpFrontEnd, HttpOptions
from loramerge_common.server import GrpcServer, ServerSettings
from tests.ports import free_port


def http(port: int, reuse_port: bool) -> HttpFrontEnd:
    options = HttpOptions(listen=f"127.0.0.1:{port}", max_body_bytes=1024, reuse_port=reuse_port)
    return HttpFrontEnd(DataPlane(), options, serving=lambda: True)


def grpc_server(port: int, reuse_port: bool) -> GrpcServer:
    return GrpcServer(ServerSettings(listen=f"127.0.0.1:{port}", reuse_port=reuse_port), [])


@pytest.mark.parametrize("reuse_port", [True, False])
def test_http_port_is_shared_only_with_reuse_port(reuse_port: bool) -> None:
    async def run() -> None:
        port = free_port()
        first, second = http(port, reuse_port), http(port, reuse_port)
        await first.start()
        try:
            if reuse_port:
                await second.start()
                assert second.port == first.port == port
                await second.stop()
            else:
                with pytest.raises(OSError):
                    await second.start()
        finally:
            await first.stop()

    asyncio.run(run())


@pytest.mark.parametrize("reuse_port", [True, False])
def test_grpc_port_is_shared_only_with_reuse_port(reuse_port: bool) -> None:
    async def run() -> None:
        port = free_port()
        first, second = grpc_server(port, reuse_port), grpc_server(port, reuse_port)
        await first.start()
        try:
            if reuse_port:
                await second.start()
                assert second.port == first.port == port
                await second.stop(0)
            else:
                with pytest.raises((OSError, RuntimeError)):
                    await second.start()
        finally:
            await first.stop(0)

    asyncio.run(run())
