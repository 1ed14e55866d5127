"""A loopback server (the shared GrpcServer plumbing) hosting both fake services, per module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2, merge_pb2_grpc

from loramerge_common.server import GrpcServer, ServerSettings, Service
from loramerge_common.testing import ServerThread
from tests.client.fakes import FakeInference, FakeMerge

MERGE_SERVICE = merge_pb2.DESCRIPTOR.services_by_name["MergeService"].full_name
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class FakeStack:
    address: str
    merge: FakeMerge
    inference: FakeInference
    server: GrpcServer


def serve_fakes(settings: ServerSettings) -> tuple[ServerThread[GrpcServer], FakeMerge, FakeInference]:
    merge, inference = FakeMerge(), FakeInference()

    async def make() -> GrpcServer:
        server = GrpcServer(
            settings,
            [
                Service(MERGE_SERVICE, merge, merge_pb2_grpc.add_MergeServiceServicer_to_server),
                Service(
                    INFERENCE_SERVICE, inference, inference_pb2_grpc.add_InferenceServiceServicer_to_server
                ),
            ],
        )
        await server.start()
        return server

    return ServerThread(make), merge, inference


PLAIN = ServerSettings(listen="127.0.0.1:0", log_format="text", log_level="WARNING")


@pytest.fixture(scope="module")
def fake_stack_module() -> Iterator[FakeStack]:
    thread, merge, inference = serve_fakes(PLAIN)
    with thread as server:
        yield FakeStack(server.address, merge, inference, server)


@pytest.fixture
def fakes(fake_stack_module: FakeStack) -> FakeStack:
    fake_stack_module.merge.reset()
    fake_stack_module.inference.reset()
    return fake_stack_module
