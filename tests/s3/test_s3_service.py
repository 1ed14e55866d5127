"""The merge service, wired from its settings, serving s3:// adapters from a loopback S3 server.

Credentials reach the service the standard way (environment variables read by boto3); the tests
check the streamed bytes against the same merge from local files, and each S3 failure's status code
over gRPC, with the secret key absent from the status and from the logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from loramerge.errors import violations_from_status
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.testing import ServerThread
from merge_service.server import build_server
from merge_service.settings import MergeSettings
from tests.s3.conftest import PRIVATE_BUCKET, PUBLIC_BUCKET, REGION, S3Server

P = merge_pb2
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def _settings(tmp: Path, adapter_root: Path, endpoint: str) -> MergeSettings:
    return MergeSettings(
        listen="127.0.0.1:0",
        metrics_port=0,
        adapter_root=adapter_root,
        hub_cache_dir=tmp / "hub",
        s3_endpoint_url=endpoint,
        s3_region=REGION,
        s3_cache_dir=tmp / "s3",
        s3_cache_bytes=64 << 20,
        cache_memory_bytes=64 << 20,
        chunk_bytes=16 << 10,
        device="cpu",
        log_format="text",
    )


def _serve(settings: MergeSettings) -> ServerThread:
    async def make():
        server, _ = build_server(settings)
        await server.start()
        return server

    return ServerThread(make)


@pytest.fixture(scope="module")
def service(
    s3_server: S3Server, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, merge_pb2_grpc.MergeServiceStub]]:
    for name in ("a", "c"):
        s3_server.upload_adapter(adapter_root / name, PUBLIC_BUCKET, f"svc/{name}")
    s3_server.upload_adapter(adapter_root / "a", PRIVATE_BUCKET, "svc/a")
    settings = _settings(tmp_path_factory.mktemp("merge-s3"), adapter_root, s3_server.endpoint_url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", s3_server.reader.access_key_id)
        mp.setenv("AWS_SECRET_ACCESS_KEY", s3_server.reader.secret_access_key)
        with _serve(settings) as server, grpc.insecure_channel(server.address) as channel:
            yield server.address, merge_pb2_grpc.MergeServiceStub(channel)


def _merge(stub: merge_pb2_grpc.MergeServiceStub, spec: P.MergeSpec) -> tuple[P.MergeHeader, bytes]:
    header, data = None, []
    for chunk in stub.Merge(P.MergeRequest(spec=spec), timeout=120):
        if chunk.WhichOneof("item") == "header":
            header = chunk.header
        elif chunk.WhichOneof("item") == "data":
            data.append(chunk.data.data)
    assert header is not None
    return header, b"".join(data)


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_merge_streams_the_bytes_of_the_local_merge(service) -> None:
    _, stub = service
    s3 = P.MergeSpec(
        adapters=[
            P.AdapterRef(id=f"s3://{PUBLIC_BUCKET}/svc/a", weight=0.6),
            P.AdapterRef(id="b", weight=0.3),
            P.AdapterRef(id=f"s3://{PUBLIC_BUCKET}/svc/c", source=P.S3),
        ],
        merge_strategy=P.DARE_TIES,
        density=0.6,
    )
    local = P.MergeSpec(
        adapters=[P.AdapterRef(id="a", weight=0.6), P.AdapterRef(id="b", weight=0.3), P.AdapterRef(id="c")],
        merge_strategy=P.DARE_TIES,
        density=0.6,
    )
    plan = stub.Plan(P.MergeRequest(spec=s3), timeout=60)
    assert [a.source for a in plan.adapters] == [P.S3, P.LOCAL, P.S3]
    assert plan.adapters[0].id == f"s3://{PUBLIC_BUCKET}/svc/a" and plan.adapters[0].revision
    header_s3, data_s3 = _merge(stub, s3)
    header_local, data_local = _merge(stub, local)
    assert hashlib.sha256(data_s3).hexdigest() == header_s3.sha256
    assert data_s3 == data_local
    # The same content has the same merge key: the second request was a cache hit.
    assert header_s3.merge_key == header_local.merge_key == plan.merge_key
    assert header_local.cache_hit


def test_status_codes(service, s3_server: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, stub = service
    cases = [
        ("s3://no-such-bucket/x", grpc.StatusCode.NOT_FOUND, "'no-such-bucket' does not exist"),
        (
            f"s3://{PUBLIC_BUCKET}/svc/zz",
            grpc.StatusCode.NOT_FOUND,
            f"s3://{PUBLIC_BUCKET}/svc/zz/adapter_config.json",
        ),
        (f"s3://{PRIVATE_BUCKET}/svc/a", grpc.StatusCode.PERMISSION_DENIED, "access denied"),
        ("s3://Bad_Bucket/x", grpc.StatusCode.INVALID_ARGUMENT, "invalid S3 bucket name"),
    ]
    for adapter_id, code, text in cases:
        spec = P.MergeSpec(adapters=[P.AdapterRef(id="b"), P.AdapterRef(id=adapter_id)])
        for call in (
            lambda spec=spec: stub.Plan(P.MergeRequest(spec=spec), timeout=60),
            lambda spec=spec: _merge(stub, spec),
        ):
            err = _error(call)
            assert err.code() == code, (adapter_id, err.details())
            assert text in err.details()
            fields = [v.field for v in violations_from_status(rpc_status.from_call(err))]
            assert fields == ["spec.adapters[1]"]
            assert s3_server.reader.secret_access_key not in err.details()
    assert s3_server.reader.secret_access_key not in caplog.text


def test_grpcurl_plan(service) -> None:
    """The README's grpcurl example, run as written against the live service."""
    address, _ = service
    body = {"spec": {"adapters": [{"id": f"s3://{PUBLIC_BUCKET}/svc/a", "weight": 0.5}, {"id": "b"}]}}
    out = subprocess.run(
        [GRPCURL, "-plaintext", "-d", json.dumps(body), address, "loramerge.v1.MergeService/Plan"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    plan = json.loads(out.stdout)
    assert plan["adapters"][0]["source"] == "S3" and plan["adapters"][0]["revision"]
    denied = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            "-d",
            json.dumps({"spec": {"adapters": [{"id": f"s3://{PRIVATE_BUCKET}/svc/a"}]}}),
            address,
            "loramerge.v1.MergeService/Plan",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode == 64 + grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "PermissionDenied" in denied.stderr and "spec.adapters[0]" in denied.stderr


@pytest.mark.usefixtures("no_aws_environment")
def test_no_credentials_and_unreachable_endpoint(
    s3_server: S3Server, adapter_root: Path, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    spec = P.MergeSpec(adapters=[P.AdapterRef(id=f"s3://{PUBLIC_BUCKET}/svc/a")])
    settings = _settings(tmp_path, adapter_root, s3_server.endpoint_url)
    with _serve(settings) as server, grpc.insecure_channel(server.address) as channel:
        err = _error(
            lambda: merge_pb2_grpc.MergeServiceStub(channel).Plan(P.MergeRequest(spec=spec), timeout=60)
        )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "AWS_ACCESS_KEY_ID" in err.details() and "AWS_PROFILE" in err.details()

    os.environ["AWS_ACCESS_KEY_ID"] = s3_server.reader.access_key_id  # undone by no_aws_environment
    os.environ["AWS_SECRET_ACCESS_KEY"] = s3_server.reader.secret_access_key
    with (
        _serve(replace(settings, s3_endpoint_url=closed)) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        err = _error(lambda: merge_pb2_grpc.MergeServiceStub(ch).Plan(P.MergeRequest(spec=spec), timeout=120))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert closed in err.details() and s3_server.reader.secret_access_key not in err.details()


def test_cli_plan_and_fetch(service, tmp_path: Path, adapter_root: Path) -> None:
    """The README's command-line example: s3:// ids with weights, mixed with a local one."""
    address, _ = service
    cli = str(Path(sys.executable).parent / "loramerge")
    common = ["-a", f"s3://{PUBLIC_BUCKET}/svc/a:0.7", "-a", "b:0.3", "--merge-addr", address]
    out = subprocess.run([cli, "plan", *common, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [a["source"] for a in plan["adapters"]] == ["S3", "LOCAL"]
    assert plan["adapters"][0]["weight"] == pytest.approx(0.7)
    fetched = subprocess.run(
        [cli, "fetch", *common, "--output", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "merged" / "adapter_model.safetensors").stat().st_size > 0
    denied = subprocess.run(
        [cli, "plan", "-a", f"s3://{PRIVATE_BUCKET}/svc/a", "--merge-addr", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert denied.returncode == 2 and "access denied" in denied.stderr
