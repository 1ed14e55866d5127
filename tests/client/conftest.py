"""Servers for the client tests: a loopback server (the shared GrpcServer plumbing) hosting both
scripted services, per module; and the real merge service as a subprocess, per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


class MergeServiceProc:
    """``python -m merge_service`` as a subprocess on loopback; ``restart()`` keeps its port."""

    def __init__(self, adapter_root: Path, log_path: Path) -> None:
        self.adapter_root = adapter_root
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        self.log_path.write_text("")
        argv = [
            sys.executable, "-m", "merge_service",
            "--listen", f"127.0.0.1:{self.port}",
            "--metrics-port", "0",
            "--adapter-root", str(self.adapter_root),
            "--device", "cpu",
            "--grace-seconds", "0",
            "--log-format", "json",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing is downloaded in tests
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"merge service exited: {self.log_path.read_text()[-3000:]}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"server started"' in line:
                    self.port = int(json.loads(line)["port"])
                    return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"merge service did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="session")
def real_merge(adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MergeServiceProc]:
    """The real merge service over the test adapters (ids "a", "b", "c", "d", "e")."""
    svc = MergeServiceProc(adapter_root, tmp_path_factory.mktemp("client-merge") / "merge.log")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
