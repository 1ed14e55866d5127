"""TLS, mutual TLS and bearer tokens end to end on real processes (the ``hardened_stack`` fixture).

The inference service serves TLS and wants its token; it reaches the merge service, which wants a
client certificate from the test CA and its own token, through a TCP proxy (TLS runs end to end
through it). A merged generation therefore proves the whole chain; the failures prove each lock.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_service.merge_client import MergeClient
from inference_service.receiver import AdapterLimits, AdapterWriter
from inference_service.settings import MergeClientSettings
from loramerge.errors import Unauthenticated, Unavailable
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2, merge_pb2_grpc
from tests.faults.stack import HUB_TOKEN_MARKER, MAX_LORA_RANK, Stack

pytestmark = pytest.mark.e2e

I = inference_pb2  # noqa: E741
M = merge_pb2
SPEC = M.MergeSpec(adapters=[M.AdapterRef(id="a", weight=0.7), M.AdapterRef(id="e", weight=0.3)])


def code_of(fn, *args, **kwargs) -> grpc.StatusCode:
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_merged_generation_over_tls_and_mutual_tls_with_tokens(hardened_stack: Stack) -> None:
    stack = hardened_stack
    merges = stack.merge.metric("loramerge_rpc_requests_total", {"method": "Merge"})
    reply = stack.inference_stub().Generate(
        I.GenerateRequest(
            prompt="The quick brown fox",
            sampling=I.SamplingParams(max_tokens=8),
            merged_adapters=M.MergeSpec(ids=["a", "b"], weights=[0.25, 0.75]),
        ),
        metadata=stack.inference_metadata,
        timeout=120,
    )
    assert reply.completion_tokens > 0 and reply.adapter.merge_key
    assert not reply.adapter.already_loaded
    # The adapter came over the mutual-TLS hop: the merge service counted the call.
    assert stack.merge.metric("loramerge_rpc_requests_total", {"method": "Merge"}) == merges + 1
    assert stack.proxy.downstream_bytes > 0


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-token"),
        pytest.param((("authorization", "Bearer wrong"),), id="wrong-token"),
        pytest.param("bare", id="token-without-bearer"),
        pytest.param("other", id="the-other-service-token"),
    ],
)
def test_missing_or_wrong_token_is_unauthenticated_on_every_rpc(hardened_stack: Stack, metadata) -> None:
    stack = hardened_stack
    if metadata == "bare":
        inference_md = (("authorization", stack.inference_token),)
        merge_md = (("authorization", stack.merge_token),)
    elif metadata == "other":
        inference_md, merge_md = stack.merge_metadata, stack.inference_metadata
    else:
        inference_md = merge_md = metadata
    inf, mer = stack.inference_stub(), stack.merge_stub()
    request = I.GenerateRequest(prompt="hi", merged_adapters=SPEC)
    calls = {
        "Generate": lambda: inf.Generate(request, metadata=inference_md, timeout=30),
        "GenerateStream": lambda: inf.GenerateStream(request, metadata=inference_md, timeout=30),
        "LoadAdapter": lambda: inf.LoadAdapter(iter([M.MergeChunk()]), metadata=inference_md, timeout=30),
        "ListAdapters": lambda: inf.ListAdapters(I.ListAdaptersRequest(), metadata=inference_md, timeout=30),
        "UnloadAdapter": lambda: inf.UnloadAdapter(
            I.UnloadAdapterRequest(name="x"), metadata=inference_md, timeout=30
        ),
        "Merge": lambda: mer.Merge(M.MergeRequest(spec=SPEC), metadata=merge_md, timeout=30),
        "Plan": lambda: mer.Plan(M.MergeRequest(spec=SPEC), metadata=merge_md, timeout=30),
        "ListCached": lambda: mer.ListCached(M.ListCachedRequest(), metadata=merge_md, timeout=30),
        "Evict": lambda: mer.Evict(M.EvictRequest(all=True), metadata=merge_md, timeout=30),
    }
    codes = {name: code_of(call) for name, call in calls.items()}
    assert codes == dict.fromkeys(calls, grpc.StatusCode.UNAUTHENTICATED)
    # Health stays open for probes, without a token.
    assert stack.serving()
    # The same calls pass with the right token (ListAdapters and Plan as witnesses).
    inf.ListAdapters(I.ListAdaptersRequest(), metadata=stack.inference_metadata, timeout=30)
    mer.Plan(M.MergeRequest(spec=SPEC), metadata=stack.merge_metadata, timeout=60)


def test_clients_without_the_right_certificates_fail_the_handshake(hardened_stack: Stack) -> None:
    stack = hardened_stack
    assert stack.pki is not None
    ca = stack.pki.ca_crt.read_bytes()
    plan = M.MergeRequest(spec=SPEC)
    without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
    rogue = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=stack.pki.rogue_client_key.read_bytes(),
        certificate_chain=stack.pki.rogue_client_crt.read_bytes(),
    )
    # The server's certificate is checked too: a client trusting another CA refuses it.
    distrusting = grpc.ssl_channel_credentials(root_certificates=stack.pki.rogue_client_crt.read_bytes())

    def merge_code(channel: grpc.Channel) -> grpc.StatusCode:
        with channel:
            stub = merge_pb2_grpc.MergeServiceStub(channel)
            return code_of(stub.Plan, plan, metadata=stack.merge_metadata, timeout=10)

    address = stack.merge.address
    assert merge_code(grpc.secure_channel(address, without_cert)) == grpc.StatusCode.UNAVAILABLE
    assert merge_code(grpc.secure_channel(address, rogue)) == grpc.StatusCode.UNAVAILABLE
    assert merge_code(grpc.secure_channel(address, distrusting)) == grpc.StatusCode.UNAVAILABLE
    assert merge_code(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    # Health over the same broken channels fails too: the lock is the handshake, not the handler.
    with grpc.secure_channel(address, without_cert) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            code_of(health.Check, health_pb2.HealthCheckRequest(), timeout=10) == grpc.StatusCode.UNAVAILABLE
        )
    assert merge_code(stack.channel(address)) == grpc.StatusCode.OK

    def inference_code(channel: grpc.Channel) -> grpc.StatusCode:
        with channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = I.ListAdaptersRequest()
            return code_of(stub.ListAdapters, request, metadata=stack.inference_metadata, timeout=10)

    address = stack.inference.address
    assert inference_code(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    assert inference_code(grpc.secure_channel(address, distrusting)) == grpc.StatusCode.UNAVAILABLE
    # The inference service asks for no client certificate: TLS plus its token is enough.
    assert inference_code(grpc.secure_channel(address, without_cert)) == grpc.StatusCode.OK


def _fetch(stack: Stack, tmp_path: Path, **overrides) -> BaseException | None:
    """One MergeClient fetch of SPEC through the proxy, with settings changed by ``overrides``."""
    assert stack.pki is not None
    tmp_path.mkdir(parents=True)
    token_file = tmp_path / "merge.token"
    token_file.write_text(str(stack.merge_token))
    values = {
        "merge_service": stack.proxy.address,
        "merge_tls_ca": stack.pki.ca_crt,
        "merge_tls_cert": stack.pki.client_crt,
        "merge_tls_key": stack.pki.client_key,
        "merge_auth_token_file": token_file,
        "merge_retry_initial_seconds": 0.1,
        "merge_retry_max_seconds": 0.2,
        **overrides,
    }
    limits = AdapterLimits(base_model=str(stack.model), max_rank=MAX_LORA_RANK, max_bytes=2**20)
    writer = AdapterWriter(tmp_path / "adapter", limits)

    async def run() -> BaseException | None:
        client = MergeClient(MergeClientSettings(**values))
        try:
            await client.fetch(SPEC, writer, deadline=time.monotonic() + 3)
        except Exception as e:
            return e
        finally:
            await client.close()
            writer.discard()
        return None

    return asyncio.run(run())


def test_the_merge_hop_needs_both_its_certificate_and_its_token(
    hardened_stack: Stack, tmp_path: Path
) -> None:
    assert _fetch(hardened_stack, tmp_path / "ok") is None

    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token")
    err = _fetch(hardened_stack, tmp_path / "token", merge_auth_token_file=wrong)
    assert isinstance(err, Unauthenticated) and "merge service" in str(err)

    t0 = time.monotonic()
    err = _fetch(hardened_stack, tmp_path / "cert", merge_tls_cert=None, merge_tls_key=None)
    assert isinstance(err, Unavailable), err
    assert time.monotonic() - t0 < 6  # gives up at its deadline (3 s), not gRPC's reconnect schedule
    assert not (tmp_path / "cert" / "adapter").exists()


def test_no_secret_reaches_logs_or_metrics(hardened_stack: Stack) -> None:
    stack = hardened_stack
    # Make the merge service use its hub client (offline: nothing leaves the machine) with the token set.
    with pytest.raises(grpc.RpcError):
        stack.merge_stub().Plan(
            M.MergeRequest(spec=M.MergeSpec(ids=["some-org/some-adapter"])),
            metadata=stack.merge_metadata,
            timeout=30,
        )
    secrets = [stack.merge_token, stack.inference_token, HUB_TOKEN_MARKER]
    texts = {
        "logs": stack.logs(),
        "merge metrics": stack.merge.metrics_text(),
        "inference metrics": stack.inference.metrics_text(),
    }
    assert '"server started"' in texts["logs"]
    for where, text in texts.items():
        for secret in secrets:
            assert secret and secret not in text, f"a secret appears in the {where}"
    # Nor in the command lines anyone on the machine can read: tokens travel in files.
    for svc in (stack.merge, stack.inference):
        for secret in secrets:
            assert secret not in " ".join(svc.argv)
