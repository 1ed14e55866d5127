"""The shared server plumbing (loramerge_common) on a real loopback server with a stand-in servicer:
health, error mapping with BadRequest details, metrics over HTTP, bearer auth, TLS and mutual TLS,
and the drain on shutdown."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from loramerge.errors import InvalidArgument, NotFound, violations_from_status
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.rpc import rpc_method
from loramerge_common.server import GrpcServer, ServerSettings, Service
from loramerge_common.testing import ServerThread

MERGE_SERVICE = merge_pb2.DESCRIPTOR.services_by_name["MergeService"].full_name


class StandIn(merge_pb2_grpc.MergeServiceServicer):
    """Plan fails according to the first id; Merge streams two chunks then fails or finishes."""

    def __init__(self) -> None:
        self.rpc_metrics = None
        self.release = threading.Event()

    @rpc_method
    async def Plan(self, request: merge_pb2.MergeRequest, context: grpc.aio.ServicerContext):
        what = request.spec.ids[0] if request.spec.ids else ""
        if what == "bad":
            raise InvalidArgument("spec.density must be in (0, 1], got 1.5", field="spec.density")
        if what == "boom":
            raise RuntimeError("disk on fire")
        return merge_pb2.PlanResponse(merge_key="k")

    @rpc_method
    async def Merge(
        self, request: merge_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator:
        yield merge_pb2.MergeChunk(data=merge_pb2.DataChunk(offset=0, data=b"ab"))
        if request.spec.ids and request.spec.ids[0] == "missing":
            raise NotFound("adapter 'missing' not found", field="spec.adapters[0].id")
        if request.spec.ids and request.spec.ids[0] == "slow":
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        yield merge_pb2.MergeChunk(data=merge_pb2.DataChunk(offset=2, data=b"cd"))


def _serve(settings: ServerSettings) -> tuple[ServerThread[GrpcServer], StandIn]:
    servicer = StandIn()

    async def make() -> GrpcServer:
        server = GrpcServer(
            settings, [Service(MERGE_SERVICE, servicer, merge_pb2_grpc.add_MergeServiceServicer_to_server)]
        )
        servicer.rpc_metrics = server.rpc_metrics
        await server.start()
        server.start_metrics()
        return server

    return ServerThread(make), servicer


BASE = ServerSettings(listen="127.0.0.1:0", log_format="text")


@pytest.fixture(scope="module")
def plain() -> Iterator[tuple[GrpcServer, StandIn]]:
    thread, servicer = _serve(BASE)
    with thread as server:
        yield server, servicer


def _metrics_text(server: GrpcServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_health_reports_each_service_and_overall(plain) -> None:
    server, _ = plain
    with grpc.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", MERGE_SERVICE):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_domain_error_maps_to_status_with_bad_request_details(plain) -> None:
    server, _ = plain
    with grpc.insecure_channel(server.address) as ch:
        stub = merge_pb2_grpc.MergeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Plan(merge_pb2.MergeRequest(spec=merge_pb2.MergeSpec(ids=["bad"])), timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.density" in err.details() and "1.5" in err.details()
    violations = violations_from_status(rpc_status.from_call(err))
    assert [v.field for v in violations] == ["spec.density"]
    assert 'loramerge_rpc_errors_total{code="INVALID_ARGUMENT",method="Plan"} 1.0' in _metrics_text(server)


def test_unexpected_exception_is_internal_with_short_message(plain) -> None:
    server, _ = plain
    with grpc.insecure_channel(server.address) as ch:
        stub = merge_pb2_grpc.MergeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Plan(merge_pb2.MergeRequest(spec=merge_pb2.MergeSpec(ids=["boom"])), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError: disk on fire" in info.value.details()


def test_error_in_a_stream_after_some_messages(plain) -> None:
    server, _ = plain
    with grpc.insecure_channel(server.address) as ch:
        stub = merge_pb2_grpc.MergeServiceStub(ch)
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for chunk in stub.Merge(
                merge_pb2.MergeRequest(spec=merge_pb2.MergeSpec(ids=["missing"])), timeout=10
            ):
                got.append(chunk.data.data)
    assert got == [b"ab"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert [v.field for v in violations_from_status(rpc_status.from_call(info.value))] == [
        "spec.adapters[0].id"
    ]
    assert 'loramerge_rpc_errors_total{code="NOT_FOUND",method="Merge"} 1.0' in _metrics_text(server)


def test_bearer_token_required_except_for_health_and_reflection(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    thread, _ = _serve(replace(BASE, auth_token_file=token_file, auth_token="ignored"))
    with thread as server, grpc.insecure_channel(server.address) as ch:
        stub = merge_pb2_grpc.MergeServiceStub(ch)
        req = merge_pb2.MergeRequest()
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")]):
            with pytest.raises(grpc.RpcError) as info:
                stub.Plan(req, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Merge(req, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            stub.Plan(req, metadata=[("authorization", "Bearer s3cret-token")], timeout=10).merge_key == "k"
        )
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        listed = {s.name for r in reflection for s in r.list_services_response.service}
        assert "loramerge.v1.MergeService" in listed
        assert "s3cret-token" not in _metrics_text(server)


def _make_pki(tmp: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, key, issuer_name, issuer_key, *, ca: bool, san: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    out: dict[str, Path] = {}

    def save(stem: str, key, crt: x509.Certificate) -> None:
        out[stem + "_key"] = tmp / f"{stem}.key"
        out[stem + "_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        out[stem + "_crt"] = tmp / f"{stem}.crt"
        out[stem + "_crt"].write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    for ca_name in ("ca", "rogue_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        save(ca_name, ca_key, cert(ca_name, ca_key, ca_subject, ca_key, ca=True, san=False))
        for leaf in ("server", "client") if ca_name == "ca" else ("client",):
            k = ec.generate_private_key(ec.SECP256R1())
            stem = leaf if ca_name == "ca" else "rogue_client"
            save(stem, k, cert(leaf, k, ca_subject, ca_key, ca=False, san=leaf == "server"))
    return out


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    from loramerge_common.tls import channel_credentials

    pki = _make_pki(tmp_path)
    options = [("grpc.ssl_target_name_override", "localhost")]
    tls = replace(BASE, tls_cert=pki["server_crt"], tls_key=pki["server_key"])
    thread, _ = _serve(tls)
    with thread as server:
        with grpc.secure_channel(server.address, channel_credentials(pki["ca_crt"]), options) as ch:
            assert (
                merge_pb2_grpc.MergeServiceStub(ch).Plan(merge_pb2.MergeRequest(), timeout=10).merge_key
                == "k"
            )
        with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as info:
            merge_pb2_grpc.MergeServiceStub(ch).Plan(merge_pb2.MergeRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    thread, _ = _serve(replace(tls, tls_client_ca=pki["ca_crt"]))
    with thread as server:
        good = channel_credentials(pki["ca_crt"], pki["client_crt"], pki["client_key"])
        with grpc.secure_channel(server.address, good, options) as ch:
            assert (
                merge_pb2_grpc.MergeServiceStub(ch).Plan(merge_pb2.MergeRequest(), timeout=10).merge_key
                == "k"
            )
        for creds in (
            channel_credentials(pki["ca_crt"]),  # no client certificate
            channel_credentials(pki["ca_crt"], pki["rogue_client_crt"], pki["rogue_client_key"]),
        ):
            with (
                grpc.secure_channel(server.address, creds, options) as ch,
                pytest.raises(grpc.RpcError) as info,
            ):
                merge_pb2_grpc.MergeServiceStub(ch).Plan(merge_pb2.MergeRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_shutdown_drains_in_flight_stream_and_refuses_new_calls() -> None:
    thread, servicer = _serve(replace(BASE, drain_seconds=0.5))
    server = thread.start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = merge_pb2_grpc.MergeServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            stream = stub.Merge(merge_pb2.MergeRequest(spec=merge_pb2.MergeSpec(ids=["slow"])), timeout=30)
            assert next(stream).data.data == b"ab"
            stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=10), thread.loop)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # drain_seconds: still answering, but NOT_SERVING
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(0.6)  # past drain_seconds: the server no longer takes calls
            with grpc.insecure_channel(server.address) as fresh, pytest.raises(grpc.RpcError) as info:
                merge_pb2_grpc.MergeServiceStub(fresh).Plan(merge_pb2.MergeRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            servicer.release.set()
            assert [c.data.data for c in stream] == [b"cd"]  # the call in flight finished
            stopping.result(15)
    finally:
        servicer.release.set()
        thread.stop()
