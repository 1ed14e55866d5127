"""The merge service on a real loopback gRPC server, called through the generated stubs.

Streamed adapters are checked against the header's sha256 and against what the offline CLI
(``loramerge merge``: no server, no cache, no proto conversion) writes for the same spec.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status
from safetensors.torch import load as load_safetensors

from loramerge.errors import violations_from_status
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_common.testing import ServerThread
from merge_service.cache import sha256_hex
from merge_service.merged import MergedAdapter
from merge_service.server import build_server
from merge_service.settings import MergeSettings
from merge_service.sources import SourceResolver
from merge_service.spec import Space, Strategy

P = merge_pb2


@dataclass
class Streamed:
    progress: list[P.MergeProgress]
    header: P.MergeHeader
    data: bytes
    trailer: P.MergeTrailer


def read_stream(chunks: Iterator[P.MergeChunk]) -> Streamed:
    """Reassemble a Merge stream, checking its order and that data offsets are contiguous."""
    progress, header, parts, trailer = [], None, [], None
    for chunk in chunks:
        kind = chunk.WhichOneof("item")
        if kind == "progress":
            assert header is None, "progress after the header"
            progress.append(chunk.progress)
        elif kind == "header":
            assert header is None
            header = chunk.header
            expected = header.offset
        elif kind == "data":
            assert header is not None and trailer is None
            assert chunk.data.offset == expected
            parts.append(chunk.data.data)
            expected += len(chunk.data.data)
        else:
            assert header is not None
            trailer = chunk.trailer
    assert header is not None and trailer is not None
    return Streamed(progress, header, b"".join(parts), trailer)


def spec_msg(*adapters: tuple[str, float], **kw) -> P.MergeSpec:
    return P.MergeSpec(adapters=[P.AdapterRef(id=i, weight=w) for i, w in adapters], **kw)


def metric(server, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def error_of(call) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), err.details(), [v.field for v in violations_from_status(rpc_status.from_call(err))]


@pytest.fixture(scope="module")
def served(adapter_root: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("merge-service")
    settings = MergeSettings(
        listen="127.0.0.1:0",
        metrics_port=0,
        adapter_root=adapter_root,
        hub_cache_dir=tmp / "hub",
        s3_cache_dir=tmp / "s3",
        cache_dir=tmp / "cache",
        cache_memory_bytes=64 << 20,
        chunk_bytes=16 << 10,
        max_adapters=4,
        max_concurrent_builds=2,
        device="cpu",
        log_format="text",
    )
    # The hub endpoint points at a closed port: a hub id must fail with UNAVAILABLE, quickly.
    resolver = SourceResolver(adapter_root, hub_cache_dir=tmp / "hub", hub_endpoint="http://127.0.0.1:9")
    holder = {}

    async def make():
        server, servicer = build_server(settings, resolver=resolver)
        holder["servicer"] = servicer
        await server.start()
        server.start_metrics()
        return server

    with ServerThread(make) as server, grpc.insecure_channel(server.address) as channel:
        yield server, holder["servicer"], merge_pb2_grpc.MergeServiceStub(channel)


def offline_cli(adapter_root: Path, argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """``loramerge merge`` (the offline CLI) on the same adapters; returns its JSON summary."""
    from loramerge_client.cli import main

    capsys.readouterr()
    code = main(["merge", *argv, "--device", "cpu", "--no-progress", "--json", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def without_ids(config_json: str) -> dict:
    """adapter_config.json minus the adapter ids it records (paths for the CLI, names for the service)."""
    config = json.loads(config_json)
    for a in config.get("loramerge", {}).get("request", {}).get("adapters", []):
        a.pop("id", None)
    return config


CASES = [
    # (strategy, space, adapters, density)
    (Strategy.LINEAR, Space.DELTA, ("a", "b", "c"), None),
    (Strategy.TIES, Space.DELTA, ("a", "b", "c"), 0.5),
    (Strategy.DARE_LINEAR, Space.DELTA, ("a", "b"), 0.7),
    (Strategy.DARE_TIES, Space.DELTA, ("a", "e"), 0.6),
    (Strategy.MAGNITUDE_PRUNE, Space.DELTA, ("b", "e"), 0.3),
    (Strategy.LINEAR, Space.FACTORS, ("a", "e"), None),
    (Strategy.TIES, Space.FACTORS, ("a", "c", "e"), 0.5),
    (Strategy.DARE_LINEAR, Space.FACTORS, ("a", "e"), 0.7),
    (Strategy.DARE_TIES, Space.FACTORS, ("a", "c"), 0.6),
    (Strategy.MAGNITUDE_PRUNE, Space.FACTORS, ("c", "e"), 0.3),
]
WEIGHTS = (0.7, 0.4, 1.1)


@pytest.mark.parametrize(
    ("strategy", "space", "ids", "density"), CASES, ids=lambda v: str(v).replace(",", "")
)
def test_each_strategy_and_space_streams_what_the_offline_cli_writes(
    served,
    adapter_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    strategy,
    space,
    ids,
    density,
) -> None:
    _, _, stub = served
    weights = WEIGHTS[: len(ids)]
    msg = spec_msg(
        *zip(ids, weights, strict=True),
        merge_strategy=P.MergeStrategy.Value(strategy.name),
        space=P.MergeSpace.Value(space.name),
    )
    if density is not None:
        msg.density = density
    got = read_stream(stub.Merge(P.MergeRequest(spec=msg), timeout=120))

    assert len(got.data) == got.header.total_bytes == got.trailer.total_bytes
    assert hashlib.sha256(got.data).hexdigest() == got.header.sha256 == got.trailer.sha256
    assert got.header.file_name == "adapter_model.safetensors" and got.header.offset == 0
    argv = [f"--adapter={adapter_root / i}:{w}" for i, w in zip(ids, weights, strict=True)]
    argv += ["--strategy", strategy.value, "--space", space.value]
    if density is not None:
        argv += ["--density", str(density)]
    summary = offline_cli(adapter_root, argv, tmp_path / "offline", capsys)
    assert got.header.merge_key == summary["merge_key"]
    assert got.data == (tmp_path / "offline" / "adapter_model.safetensors").read_bytes()
    config = (tmp_path / "offline" / "adapter_config.json").read_text()
    assert without_ids(got.header.adapter_config_json) == without_ids(config)
    assert json.loads(config)["r"] == got.header.rank
    tensors = load_safetensors(got.data)
    assert len(tensors) == 2 * len(got.header.modules) == 2 * 2 * 7  # A and B; 2 layers × 7 projections
    if not got.header.cache_hit:
        assert got.progress and got.progress[-1].done == got.progress[-1].total


def test_second_request_is_a_cache_hit_with_the_same_bytes(served) -> None:
    _, _, stub = served
    req = P.MergeRequest(spec=spec_msg(("a", 0.25), ("b", 0.5)))
    first = read_stream(stub.Merge(req, timeout=120))
    second = read_stream(stub.Merge(req, timeout=120))
    assert not first.header.cache_hit and second.header.cache_hit
    assert second.progress == []
    assert first.data == second.data and first.header.merge_key == second.header.merge_key


def test_lorax_shorthand_and_permutation_give_the_same_merge(served) -> None:
    _, _, stub = served
    long_form = stub.Plan(P.MergeRequest(spec=spec_msg(("a", 0.5), ("b", 0.25))), timeout=60)
    short = stub.Plan(P.MergeRequest(spec=P.MergeSpec(ids=["b", "a"], weights=[0.25, 0.5])), timeout=60)
    assert long_form.merge_key == short.merge_key
    assert [a.id for a in short.adapters] == ["b", "a"]
    assert [a.rank for a in short.adapters] == [4, 8] and short.adapters[0].alpha == 8
    assert short.effective_spec.merge_strategy == P.LINEAR
    assert short.effective_spec.adapters[1].weight == pytest.approx(0.5)


def test_resume_from_an_offset_gives_the_same_bytes(served) -> None:
    _, _, stub = served
    req = P.MergeRequest(spec=spec_msg(("a", 1.0), ("c", -0.5)))
    full = read_stream(stub.Merge(req, timeout=120))
    for offset in (1, full.header.total_bytes // 3, full.header.total_bytes):
        resumed = read_stream(
            stub.Merge(
                P.MergeRequest(spec=req.spec, resume_offset=offset, expected_merge_key=full.header.merge_key),
                timeout=60,
            )
        )
        assert resumed.header.offset == offset
        assert full.data[:offset] + resumed.data == full.data
        assert resumed.header.sha256 == full.header.sha256


def test_sixteen_concurrent_identical_requests_build_once(served) -> None:
    server, _, _ = served
    spec = spec_msg(("a", 0.3), ("b", 0.6), ("e", 0.9), merge_strategy=P.TIES, density=0.4)
    before = metric(server, "loramerge_merge_builds_total")
    barrier = threading.Barrier(16)

    def one(_: int) -> Streamed:
        with grpc.insecure_channel(server.address) as ch:
            barrier.wait(30)
            return read_stream(
                merge_pb2_grpc.MergeServiceStub(ch).Merge(P.MergeRequest(spec=spec), timeout=120)
            )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert metric(server, "loramerge_merge_builds_total") - before == 1
    assert len({r.data for r in results}) == 1
    assert sum(not r.header.cache_hit for r in results) >= 1


@pytest.mark.parametrize(
    ("spec", "code", "field", "words"),
    [
        (
            spec_msg(("a", 1.0), ("b", 1.0), merge_strategy=P.TIES, density=1.5),
            "INVALID_ARGUMENT",
            "spec.density",
            "1.5",
        ),
        (spec_msg(("a", 1.0), merge_strategy=P.TIES), "INVALID_ARGUMENT", "spec.density", "required"),
        (
            P.MergeSpec(ids=["a", "b"], weights=[1.0]),
            "INVALID_ARGUMENT",
            "spec.weights",
            "1 weights for 2 ids",
        ),
        (P.MergeSpec(ids=["a"], adapters=[P.AdapterRef(id="b")]), "INVALID_ARGUMENT", "spec.ids", "use one"),
        (P.MergeSpec(), "INVALID_ARGUMENT", "spec.adapters", "at least one"),
        (spec_msg(("a", 1.0), merge_strategy=42), "INVALID_ARGUMENT", "spec.merge_strategy", "42"),
        (spec_msg(("a", 1.0), ("b", 1.0), space=P.FACTORS), "INVALID_ARGUMENT", "spec.space", "equal ranks"),
        (
            P.MergeSpec(adapters=[P.AdapterRef(id="nope", source=P.LOCAL)]),
            "NOT_FOUND",
            "spec.adapters[0]",
            "nope",
        ),
        (spec_msg(("a", 1.0), ("d", 1.0)), "FAILED_PRECONDITION", "spec.adapters", "other/base-model"),
        (spec_msg(("a", 1.0), target_rank=16, max_rank=8), "FAILED_PRECONDITION", "spec.target_rank", "16"),
        (P.MergeSpec(ids=["a", "b", "c", "e", "a"]), "RESOURCE_EXHAUSTED", "spec.adapters", "5 adapters"),
        (spec_msg(("someorg/some-adapter", 1.0)), "UNAVAILABLE", "spec.adapters[0]", "someorg/some-adapter"),
    ],
    ids=[
        "density-out-of-range",
        "density-missing",
        "weights-length",
        "ids-and-adapters",
        "no-adapters",
        "unknown-strategy",
        "factors-ranks",
        "not-found",
        "base-model-mismatch",
        "rank-above-max",
        "too-many-adapters",
        "hub-unreachable",
    ],
)
def test_each_error_class(served, spec: P.MergeSpec, code: str, field: str, words: str) -> None:
    server, servicer, stub = served
    cached_before = len(servicer.cache.entries())
    for call in (
        lambda: stub.Plan(P.MergeRequest(spec=spec), timeout=60),
        lambda: list(stub.Merge(P.MergeRequest(spec=spec), timeout=60)),
    ):
        got_code, details, fields = error_of(call)
        assert got_code.name == code, details
        assert fields and fields[0].startswith(field), fields
        assert words in details
    assert len(servicer.cache.entries()) == cached_before  # nothing half-made was cached
    assert metric(server, "loramerge_rpc_errors_total", f'{{code="{code}",method="Merge"}}') >= 1


def test_resume_errors(served) -> None:
    _, _, stub = served
    spec = spec_msg(("a", 1.0), ("b", 2.0))
    full = read_stream(stub.Merge(P.MergeRequest(spec=spec), timeout=120))
    code, details, fields = error_of(
        lambda: list(
            stub.Merge(P.MergeRequest(spec=spec, resume_offset=full.header.total_bytes + 1), timeout=60)
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["resume_offset"])
    assert str(full.header.total_bytes + 1) in details
    code, details, fields = error_of(
        lambda: list(
            stub.Merge(P.MergeRequest(spec=spec, resume_offset=5, expected_merge_key="0" * 64), timeout=60)
        )
    )
    assert (code, fields) == (grpc.StatusCode.FAILED_PRECONDITION, ["expected_merge_key"])
    assert full.header.merge_key in details


def test_failed_build_caches_nothing_and_reports_to_every_waiter(served, adapter_root: Path) -> None:
    """An adapter whose weights change between plan and build fails the build for everyone."""
    import shutil

    _, servicer, stub = served
    bad = adapter_root / "flaky"
    shutil.copytree(adapter_root / "a", bad)
    spec = spec_msg(("flaky", 1.0), ("b", 1.0))
    plan = stub.Plan(P.MergeRequest(spec=spec), timeout=60)
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    code, _, _ = error_of(lambda: list(stub.Merge(P.MergeRequest(spec=spec), timeout=60)))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert plan.merge_key not in {e.merge_key for e in servicer.cache.entries()}
    shutil.rmtree(bad)


def test_client_cancellation_stops_the_stream(served) -> None:
    server, servicer, stub = served
    spec = spec_msg(("b", 0.123))
    key = stub.Plan(P.MergeRequest(spec=spec), timeout=60).merge_key
    data = bytes(range(256)) * (128 << 10)  # 32 MiB under the real key: streaming is what is tested
    servicer.cache.put(MergedAdapter(key, "{}", data, sha256_hex(data), 4, (), "tiny", 0.0))
    sent_before = metric(server, "loramerge_merge_bytes_streamed_total")
    cancelled_before = metric(server, "loramerge_rpc_errors_total", '{code="CANCELLED",method="Merge"}')
    call = stub.Merge(P.MergeRequest(spec=spec), timeout=60)
    assert next(call).WhichOneof("item") == "header"
    assert next(call).WhichOneof("item") == "data"
    call.cancel()
    deadline = time.monotonic() + 10
    while (
        metric(server, "loramerge_rpc_errors_total", '{code="CANCELLED",method="Merge"}') == cancelled_before
    ):
        assert time.monotonic() < deadline, "the server did not see the cancellation"
        time.sleep(0.05)
    sent = metric(server, "loramerge_merge_bytes_streamed_total") - sent_before
    assert sent < len(data) / 2
    servicer.cache.evict(key)


def test_disk_cache_corruption_is_detected_and_rebuilt(served) -> None:
    server, servicer, stub = served
    req = P.MergeRequest(spec=spec_msg(("c", 0.5), ("e", 0.5), space=P.FACTORS))
    first = read_stream(stub.Merge(req, timeout=120))
    key = first.header.merge_key
    servicer.cache.memory.pop(key)  # as after a restart: only the disk copy is left
    disk_file = servicer.cache.disk.dir / f"{key}.safetensors"
    raw = bytearray(disk_file.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    disk_file.write_bytes(bytes(raw))
    corrupt_before = metric(server, "loramerge_merge_cache_corrupt_total")
    builds_before = metric(server, "loramerge_merge_builds_total")
    again = read_stream(stub.Merge(req, timeout=120))
    assert not again.header.cache_hit
    assert again.data == first.data
    assert metric(server, "loramerge_merge_cache_corrupt_total") == corrupt_before + 1
    assert metric(server, "loramerge_merge_builds_total") == builds_before + 1
    assert disk_file.read_bytes() == first.data  # rewritten


def test_list_cached_and_evict(served) -> None:
    _, _, stub = served
    req = P.MergeRequest(spec=spec_msg(("e", 2.0)))
    key = read_stream(stub.Merge(req, timeout=120)).header.merge_key
    listing = stub.ListCached(P.ListCachedRequest(), timeout=30)
    [entry] = [e for e in listing.entries if e.merge_key == key]
    assert entry.in_memory and entry.on_disk and entry.bytes > 0 and entry.rank == 8
    assert 0 < listing.memory_bytes <= listing.memory_limit_bytes == 64 << 20
    cached_plan = stub.Plan(req, timeout=30)
    assert cached_plan.cached and cached_plan.estimated_build_seconds == 0.0
    assert stub.Evict(P.EvictRequest(merge_key=key), timeout=30).evicted == 1
    assert stub.Evict(P.EvictRequest(merge_key=key), timeout=30).evicted == 0
    fresh_plan = stub.Plan(req, timeout=30)
    assert not fresh_plan.cached and 0.0 < fresh_plan.estimated_build_seconds < 60.0
    assert not read_stream(stub.Merge(req, timeout=120)).header.cache_hit
    for bad, field in ((P.EvictRequest(), "merge_key"), (P.EvictRequest(merge_key="../x"), "merge_key")):
        code, _, fields = error_of(lambda bad=bad: stub.Evict(bad, timeout=30))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


def test_settings_from_environment(adapter_root: Path) -> None:
    from loramerge_common.settings import load_settings
    from merge_service.settings import ENV_PREFIX

    s = load_settings(
        MergeSettings,
        ENV_PREFIX,
        ["--chunk-bytes", "256KiB"],
        {"LORAMERGE_MERGE_CACHE_MEMORY_BYTES": "2GiB", "LORAMERGE_MERGE_ADAPTER_ROOT": str(adapter_root)},
    )
    assert (s.chunk_bytes, s.cache_memory_bytes, s.adapter_root) == (256 << 10, 2 << 30, adapter_root)
    assert s.listen == "0.0.0.0:50061" and s.metrics_port == 9461
    s.validate()
    with pytest.raises(ValueError, match="DEVICE"):
        replace(s, device="tpu").validate()


def test_byte_limits_per_adapter_and_per_request(adapter_root: Path, tmp_path: Path) -> None:
    size_a = sum(f.stat().st_size for f in (adapter_root / "a").iterdir())
    size_b = sum(f.stat().st_size for f in (adapter_root / "b").iterdir())
    settings = MergeSettings(
        listen="127.0.0.1:0",
        adapter_root=adapter_root,
        hub_cache_dir=tmp_path / "hub",
        s3_cache_dir=tmp_path / "s3",
        max_adapter_bytes=max(size_a, size_b) - 1,  # "a" (rank 8) is too big, "b" (rank 4) fits
        max_request_bytes=size_b + size_b // 2,  # one "b" fits, two do not
        device="cpu",
        log_format="text",
    )

    async def make():
        server, _ = build_server(settings)
        await server.start()
        return server

    with ServerThread(make) as server, grpc.insecure_channel(server.address) as ch:
        stub = merge_pb2_grpc.MergeServiceStub(ch)
        assert stub.Plan(P.MergeRequest(spec=P.MergeSpec(ids=["b"])), timeout=60).merge_key
        for ids, field, words in (
            (["b", "a"], "spec.adapters[1]", "max_adapter_bytes"),
            (["b", "b"], "spec.adapters", "allowed per merge"),
        ):
            code, details, fields = error_of(
                lambda ids=ids: list(stub.Merge(P.MergeRequest(spec=P.MergeSpec(ids=ids)), timeout=60))
            )
            assert (code, fields) == (grpc.StatusCode.RESOURCE_EXHAUSTED, [field]), details
            assert words in details


def test_plan_reports_interference_matching_dense_deltas(served, adapter_root: Path) -> None:
    """Plan(interference=true) over real adapter files: the overall cosine equals the dense one."""
    import torch

    from tests.factories import lora_delta

    _, _, stub = served
    plain = stub.Plan(P.MergeRequest(spec=spec_msg(("a", 1.0), ("b", -0.5))), timeout=60)
    assert not plain.HasField("interference")
    resp = stub.Plan(P.MergeRequest(spec=spec_msg(("a", 1.0), ("b", -0.5)), interference=True), timeout=60)
    rep = resp.interference
    (pair,) = rep.pairs
    modules = [m.module for m in pair.modules]
    da = torch.cat([lora_delta(adapter_root / "a", m).flatten() for m in modules]).double()
    db = -0.5 * torch.cat([lora_delta(adapter_root / "b", m).flatten() for m in modules]).double()
    assert pair.overall.cosine == pytest.approx(float(da @ db / (da.norm() * db.norm())), rel=1e-4, abs=1e-6)
    assert list(rep.adapter_norms) == pytest.approx([float(da.norm()), float(db.norm())], rel=1e-4)
    assert rep.density == pytest.approx(0.2) and 0 <= pair.overall.sign_conflict <= 1
    assert resp.merge_key == plain.merge_key


def test_plan_answers_from_the_configs_it_planned(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan's response uses the configs the plan read, not a second read of the files (which could see
    other content, and named no spec field in its errors)."""
    import merge_service.adapter as adapter_module
    import merge_service.pipeline as pipeline_module

    _, _, stub = served
    reads: list[str] = []
    real = pipeline_module.read_config

    def counting(path, adapter_id, field="adapter"):
        reads.append(field)
        return real(path, adapter_id, field)

    monkeypatch.setattr(pipeline_module, "read_config", counting)
    monkeypatch.setattr(adapter_module, "read_config", counting)
    reply = stub.Plan(P.MergeRequest(spec=spec_msg(("a", 0.5), ("b", 0.25))), timeout=60)
    assert [a.id for a in reply.adapters] == ["a", "b"] and all(a.rank for a in reply.adapters)
    assert reads == ["spec.adapters[0]", "spec.adapters[1]"]
