"""The blocking clients against scripted servicers on a real loopback gRPC server: every method,
retries on UNAVAILABLE only, deadlines, metadata, TLS and the mapping of each status to its error."""

from __future__ import annotations

import datetime
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from loramerge import errors as E
from loramerge.v1 import merge_pb2
from loramerge_client import (
    NO_RETRY,
    DataLoss,
    InferenceClient,
    LoramergeError,
    MergeClient,
    MergedAdapters,
    RetryPolicy,
    SamplingParams,
    TlsOptions,
)
from tests.client.conftest import PLAIN, FakeStack, serve_fakes
from tests.client.fakes import CONFIG, SHA, WEIGHTS

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
SPEC = MergedAdapters(ids=["a", "b"], weights=[0.6, 0.4], merge_strategy="TIES", density=0.5)


def unavailable() -> E.Unavailable:
    return E.Unavailable("merge service is restarting")


@pytest.fixture
def merge(fakes: FakeStack):
    with MergeClient(fakes.address, retry=FAST, timeout=10) as client:
        yield client


@pytest.fixture
def inference(fakes: FakeStack):
    with InferenceClient(fakes.address, retry=FAST, timeout=10) as client:
        yield client


def test_merge_client_methods(fakes: FakeStack, merge: MergeClient, tmp_path: Path) -> None:
    plan = merge.plan(SPEC)
    assert plan.merge_key == "key-1"
    sent = fakes.merge.seen.requests[-1].spec
    assert list(sent.ids) == ["a", "b"] and sent.merge_strategy == merge_pb2.TIES
    assert sent.density == pytest.approx(0.5)

    progress: list[tuple[int, int]] = []
    result = merge.merge(
        SPEC, output_dir=tmp_path / "out", on_progress=lambda p: progress.append((p.done, p.total))
    )
    assert result.data == WEIGHTS and result.sha256 == SHA and result.merge_key == "key-1"
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert (tmp_path / "out" / "adapter_config.json").read_text() == CONFIG
    assert result.config["r"] == 4

    assert [e.merge_key for e in merge.list_cached().entries] == ["key-1"]
    assert merge.evict("key-1") == 1
    assert merge.evict(all=True) == 5
    assert fakes.merge.seen.requests[-1].all is True
    assert merge.health() == "SERVING"
    assert merge.health("") == "SERVING"


def test_inference_client_methods(fakes: FakeStack, inference: InferenceClient, tmp_path: Path) -> None:
    resp = inference.generate("hi there", SPEC, SamplingParams(max_tokens=5, seed=3))
    assert resp.text == "echo: hi there"
    req = fakes.inference.seen.requests[-1]
    assert req.merged_adapters.merge_strategy == merge_pb2.TIES and req.sampling.max_tokens == 5
    assert req.sampling.HasField("seed")

    inference.generate("x", "org/one")
    assert fakes.inference.seen.requests[-1].adapter_id == "org/one"
    inference.generate("x", merge_key="key-1")
    assert fakes.inference.seen.requests[-1].merge_key == "key-1"

    deltas = list(inference.generate_stream("one two three"))
    assert "".join(d.text for d in deltas) == "one two three"
    assert deltas[-1].finish_reason != 0

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (folder / "adapter_config.json").write_text(CONFIG)
    loaded = inference.load_adapter(folder, merge_key="mine")
    assert loaded.merge_key == "mine"
    header, data = fakes.inference.loaded[-1]
    assert data == WEIGHTS and header.sha256 == SHA and header.rank == 4

    assert [a.merge_key for a in inference.list_adapters().adapters] == ["key-1"]
    assert inference.unload_adapter("key-1") is True
    assert inference.unload_adapter(name="nope") is False
    assert inference.health() == "SERVING"


def test_merge_stream_piped_into_load_adapter(
    fakes: FakeStack, merge: MergeClient, inference: InferenceClient
):
    loaded = inference.load_adapter(merge.merge_chunks(SPEC))
    assert loaded.merge_key == "key-1"
    kinds = fakes.inference.seen.requests[-1]
    assert "progress" not in kinds and kinds[0] == "header" and kinds[-1] == "trailer"
    assert fakes.inference.loaded[-1][1] == WEIGHTS

    result = merge.merge(SPEC)
    fakes.inference.fail = [unavailable()]  # a finished result can be pushed again: retried
    assert inference.load_adapter(result).merge_key == "key-1"
    assert len(fakes.inference.seen.requests) == 3


def test_retries_unavailable_then_succeeds(fakes: FakeStack, merge: MergeClient) -> None:
    fakes.merge.fail = [unavailable(), unavailable()]
    assert merge.plan(SPEC).merge_key == "key-1"
    assert len(fakes.merge.seen.requests) == 3


def test_gives_up_after_max_attempts(fakes: FakeStack, merge: MergeClient) -> None:
    fakes.merge.fail = [unavailable()] * 10
    with pytest.raises(E.Unavailable) as info:
        merge.plan(SPEC)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(fakes.merge.seen.requests) == FAST.max_attempts


@pytest.mark.parametrize(
    "err",
    [
        E.InvalidArgument("spec.density must be in (0, 1], got 1.5", field="spec.density"),
        E.Internal("disk on fire"),
        E.DeadlineExceeded("merge took too long"),
        E.ResourceExhausted("spec.adapters has 40 entries, at most 16", field="spec.adapters"),
    ],
)
def test_other_codes_are_not_retried(fakes: FakeStack, merge: MergeClient, err: E.LoramergeError) -> None:
    fakes.merge.fail = [err, None]
    with pytest.raises(type(err)):
        merge.plan(SPEC)
    assert len(fakes.merge.seen.requests) == 1


@pytest.mark.parametrize(
    "err",
    [
        E.InvalidArgument("spec.density must be in (0, 1], got 1.5", field="spec.density"),
        E.NotFound("adapter 'nope' not found", field="spec.adapters[0].id"),
        E.FailedPrecondition("rank 64 exceeds max_lora_rank 16", field="spec.target_rank"),
        E.ResourceExhausted("spec.adapters has 40 entries, at most 16", field="spec.adapters"),
        E.PermissionDenied("not allowed"),
        E.Unauthenticated("missing token"),
        E.Unavailable("down"),
        E.DeadlineExceeded("too slow"),
        E.Internal("boom"),
    ],
)
def test_each_status_maps_to_its_error(fakes: FakeStack, inference: InferenceClient, err) -> None:
    fakes.inference.fail = [err] * 10
    with InferenceClient(fakes.address, retry=NO_RETRY) as client, pytest.raises(LoramergeError) as info:
        client.generate("hi", SPEC)
    got = info.value
    assert type(got) is type(err)
    assert got.code == err.code
    assert got.message == err.message
    assert [(v.field, v.description) for v in got.violations] == [
        (v.field, v.description) for v in err.violations
    ]


def test_unknown_exception_maps_to_internal(fakes: FakeStack, merge: MergeClient) -> None:
    fakes.merge.fail = [RuntimeError("secret detail")]  # type: ignore[list-item]
    with pytest.raises(E.Internal) as info:
        merge.plan(SPEC)
    assert info.value.code == grpc.StatusCode.INTERNAL


def test_deadline_exceeded(fakes: FakeStack) -> None:
    fakes.merge.delay = 2.0
    start = time.monotonic()
    with MergeClient(fakes.address, retry=FAST) as client, pytest.raises(E.DeadlineExceeded) as info:
        client.plan(SPEC, timeout=0.3)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 1.5


def test_deadline_bounds_all_retries() -> None:
    # Nothing listens on this port: every attempt is UNAVAILABLE; the deadline stops the backoff.
    slow = RetryPolicy(max_attempts=100, initial_backoff=0.1, max_backoff=0.2, jitter=0)
    start = time.monotonic()
    with MergeClient("127.0.0.1:1", retry=slow) as client, pytest.raises(E.Unavailable):
        client.plan(SPEC, timeout=1.0)
    assert time.monotonic() - start < 2.0


def test_generate_stream_retries_only_before_first_message(fakes: FakeStack, inference: InferenceClient):
    fakes.inference.fail = [unavailable()]
    assert "".join(d.text for d in inference.generate_stream("a b c")) == "a b c"
    assert len(fakes.inference.seen.requests) == 2

    fakes.inference.reset()
    fakes.inference.break_after = 2  # two words out, then the server goes away
    got: list[str] = []
    with pytest.raises(E.Unavailable):
        for delta in inference.generate_stream("a b c d"):
            got.append(delta.text)
    assert got == ["a ", "b "]  # no repeated text
    assert len(fakes.inference.seen.requests) == 1


def test_merge_resumes_after_broken_stream(fakes: FakeStack, merge: MergeClient) -> None:
    fakes.merge.break_after = 1
    result = merge.merge(SPEC)
    assert result.data == WEIGHTS and result.resumed == 1
    first, second = fakes.merge.seen.requests
    assert first.resume_offset == 0 and first.expected_merge_key == ""
    assert second.resume_offset == 4096 and second.expected_merge_key == "key-1"


def test_corrupt_merge_stream_raises_data_loss_and_writes_nothing(
    fakes: FakeStack, merge: MergeClient, tmp_path: Path
) -> None:
    fakes.merge.corrupt = True
    with pytest.raises(DataLoss) as info:
        merge.merge(SPEC, output_dir=tmp_path / "out")
    assert info.value.code == grpc.StatusCode.DATA_LOSS and "sha256" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_metadata_carries_token_and_extras(fakes: FakeStack) -> None:
    with InferenceClient(fakes.address, token="t0k", metadata=[("X-Team", "ml")]) as client:
        client.generate("hi")
    md = fakes.inference.seen.metadata[-1]
    assert md["authorization"] == "Bearer t0k" and md["x-team"] == "ml"


def test_bearer_auth_against_real_interceptor() -> None:
    thread, _, _ = serve_fakes(replace(PLAIN, auth_token="s3cret"))
    with thread as server:
        with MergeClient(server.address, retry=NO_RETRY) as anon, pytest.raises(E.Unauthenticated) as info:
            anon.plan(SPEC)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with MergeClient(server.address, token="s3cret") as client:
            assert client.plan(SPEC).merge_key == "key-1"
            assert client.health() == "SERVING"


def test_address_from_environment(fakes: FakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGE_ADDR", fakes.address)
    with MergeClient() as client:
        assert client.address == fakes.address and client.plan(SPEC).merge_key == "key-1"


def _pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for "localhost" and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    paths: dict[str, Path] = {}

    def issue(cn: str, key, *, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(ca_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if cn == "localhost":
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    for stem, key, crt in [
        ("ca", ca_key, issue("test-ca", ca_key, ca=True)),
        *[
            (s, k, issue(cn, k, ca=False))
            for s, cn, k in [
                ("server", "localhost", ec.generate_private_key(ec.SECP256R1())),
                ("client", "client", ec.generate_private_key(ec.SECP256R1())),
            ]
        ],
    ]:
        paths[stem + "_key"] = tmp / f"{stem}.key"
        paths[stem + "_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        paths[stem + "_crt"] = tmp / f"{stem}.crt"
        paths[stem + "_crt"].write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    return paths


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    mtls = replace(PLAIN, tls_cert=pki["server_crt"], tls_key=pki["server_key"], tls_client_ca=pki["ca_crt"])
    thread, _, _ = serve_fakes(mtls)
    with thread as server:
        good = TlsOptions.from_files(
            ca=pki["ca_crt"], cert=pki["client_crt"], key=pki["client_key"], server_name="localhost"
        )
        with MergeClient(server.address, tls=good) as client:
            assert client.plan(SPEC).merge_key == "key-1"
        no_cert = TlsOptions.from_files(ca=pki["ca_crt"], server_name="localhost")
        for tls in (no_cert, None):
            with MergeClient(server.address, tls=tls, retry=NO_RETRY) as client, pytest.raises(E.Unavailable):
                client.plan(SPEC, timeout=5)
    with pytest.raises(ValueError, match="needs its key"):
        TlsOptions.from_files(ca=pki["ca_crt"], cert=pki["client_crt"])
