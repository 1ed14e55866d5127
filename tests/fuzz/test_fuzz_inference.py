"""Property-based fuzzing of every InferenceService RPC on the hardened stack (real vLLM, TLS, token).

Generate and GenerateStream get random and adversarial prompts, sampling parameters and adapter
choices (most fail validation or reach the merge service's error paths; the valid ones generate).
LoadAdapter gets a real merged adapter stream with random damage: whatever is accepted must be the
untouched bytes. Afterwards the service is healthy, logged no INTERNAL error, and its adapter folders
are exactly the adapters it lists.
"""

from __future__ import annotations

import collections
import hashlib

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_service.request_specs import normalize_spec
from loramerge.v1 import inference_pb2, merge_pb2
from tests.faults.stack import MAX_LORA_RANK, Stack
from tests.fuzz.messages import TEXT, UINT64, check_error, generate_requests

pytestmark = pytest.mark.e2e

I = inference_pb2  # noqa: E741
M = merge_pb2
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
GENERATE_FIELDS = (
    "prompt",
    "sampling",
    "adapter_id",
    "adapter_source",
    "adapter_revision",
    "adapter_weight",
    "merged_adapters",
    "merge_key",
)
PUSH_FIELDS = ("header", "data", "trailer", "adapter")


def listing(stack: Stack) -> dict[str, int]:
    reply = stack.inference_stub().ListAdapters(
        I.ListAdaptersRequest(), metadata=stack.inference_metadata, timeout=30
    )
    return {a.merge_key: a.lora_int_id for a in reply.adapters}


def assert_no_stray_folders(stack: Stack) -> None:
    ids = sorted(listing(stack).values())
    assert sorted(int(f.split("-")[0]) for f in stack.adapter_folders()) == ids


@pytest.fixture
def inference_fuzz(hardened_stack: Stack):
    """The stack and its stub; afterwards: healthy, still generating, no INTERNAL error, no stray folder."""
    stack = hardened_stack
    internal = stack.inference.metric("loramerge_rpc_errors_total", {"code": "INTERNAL"})
    yield stack, stack.inference_stub()
    assert stack.serving()
    assert stack.inference.metric("loramerge_rpc_errors_total", {"code": "INTERNAL"}) == internal
    assert "EngineDeadError" not in stack.inference.log_text()
    reply = stack.inference_stub().Generate(
        I.GenerateRequest(prompt="The quick brown fox"), metadata=stack.inference_metadata, timeout=60
    )
    assert reply.completion_tokens > 0
    assert_no_stray_folders(stack)


def check_generation(request: I.GenerateRequest, replies: list) -> None:
    last = replies[-1]
    limit = request.sampling.max_tokens or 16
    tokens = [t for r in replies for t in r.token_ids]
    assert last.finish_reason in (I.STOP, I.LENGTH)
    assert len(tokens) == last.completion_tokens <= limit
    assert last.prompt_tokens > 0
    if request.request_id:
        assert all(r.request_id == request.request_id for r in replies)
    if request.adapter_id or request.HasField("merged_adapters") or request.merge_key:
        assert replies[0].adapter.merge_key and replies[0].adapter.name


def test_fuzz_generate(inference_fuzz) -> None:
    stack, stub = inference_fuzz
    codes: collections.Counter[str] = collections.Counter()

    @settings(FUZZ, max_examples=400)
    @given(request=generate_requests(), streaming=st.booleans())
    def generate(request: I.GenerateRequest, streaming: bool) -> None:
        try:
            if streaming:
                replies = list(stub.GenerateStream(request, metadata=stack.inference_metadata, timeout=120))
            else:
                replies = [stub.Generate(request, metadata=stack.inference_metadata, timeout=120)]
        except grpc.RpcError as e:
            check_error(e, GENERATE_FIELDS, [request])
            codes[e.code().name] += 1
            return
        codes["OK"] += 1
        check_generation(request, replies)

    generate()
    # The fuzzer reached generation, request validation and the merge service's own verdicts.
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0, codes
    assert codes["NOT_FOUND"] + codes["FAILED_PRECONDITION"] + codes["RESOURCE_EXHAUSTED"] > 0, codes


@pytest.fixture(scope="module")
def pushed_stream(hardened_stack: Stack) -> list[M.MergeChunk]:
    """A real merged adapter in the Merge stream format (progress, header, data, trailer)."""
    stack = hardened_stack
    spec = M.MergeSpec(adapters=[M.AdapterRef(id="b", weight=0.9), M.AdapterRef(id="e", weight=-0.4)])
    request = M.MergeRequest(spec=normalize_spec(spec, MAX_LORA_RANK))
    chunks = list(stack.merge_stub().Merge(request, metadata=stack.merge_metadata, timeout=120))
    assert sum(c.WhichOneof("item") == "data" for c in chunks) > 3
    return chunks


DAMAGE = st.sampled_from(
    [
        "none",
        "drop",
        "duplicate",
        "swap",
        "truncate",
        "flip-byte",
        "data-offset",
        "extra-data",
        "second-header",
        "header-total",
        "header-sha",
        "header-key",
        "header-rank",
        "header-base",
        "header-config",
        "header-offset",
        "header-file",
        "trailer",
        "random",
    ]
)
CONFIGS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            "[]",
            "null",
            '{"peft_type": "PROMPT_TUNING"}',
            '{"peft_type": "LORA", "r": 8, "use_dora": true}',
            '{"peft_type": "LORA", "r": 8, "bias": "all"}',
            '{"peft_type": "LORA", "r": 100000}',
            '{"peft_type": "LORA", "r": "8"}',
            '{"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 64}}',
            '{"peft_type": "LORA", "r": 8, "target_modules": ["../../etc"]}',
            '{"peft_type": "LORA", "r": 8, "base_model_name_or_path": "other/base-model"}',
        ]
    ),
)


RANDOM_CHUNKS = st.one_of(
    st.builds(lambda o, b: M.MergeChunk(data=M.DataChunk(offset=o, data=b)), UINT64, st.binary(max_size=64)),
    st.builds(lambda t, s: M.MergeChunk(trailer=M.MergeTrailer(total_bytes=t, sha256=s)), UINT64, TEXT),
    st.builds(lambda s, n: M.MergeChunk(progress=M.MergeProgress(stage=s, done=n)), TEXT, st.integers(0, 9)),
    st.builds(
        lambda k, t, c: M.MergeChunk(header=M.MergeHeader(merge_key=k, total_bytes=t, adapter_config_json=c)),
        TEXT,
        UINT64,
        CONFIGS,
    ),
)


@st.composite
def damages(draw: st.DrawFn, n_chunks: int, data_at: list[int]) -> dict:
    """A description of one kind of damage to a stream of ``n_chunks`` (data chunks at ``data_at``)."""
    kind = draw(DAMAGE)
    d: dict = {"kind": kind, "i": draw(st.integers(0, n_chunks - 1)), "d": draw(st.sampled_from(data_at))}
    if kind == "swap":
        d["j"] = draw(st.integers(0, n_chunks - 1))
    elif kind == "flip-byte":
        d["byte"], d["xor"] = draw(st.integers(0, 2**14)), draw(st.integers(1, 255))
    elif kind in ("data-offset", "header-total"):
        d["value"] = draw(st.one_of(UINT64, st.sampled_from([-1, 1])))  # ±1: next to the real value
    elif kind == "extra-data":
        d["value"] = draw(st.binary(min_size=1, max_size=64))
    elif kind in ("header-sha",):
        d["value"] = draw(st.one_of(TEXT, st.text("0123456789abcdef", min_size=64, max_size=64)))
    elif kind == "header-key":
        d["value"] = draw(TEXT)
    elif kind == "header-rank":
        d["value"] = draw(st.integers(MAX_LORA_RANK + 1, 2**32 - 1))
    elif kind == "header-base":
        d["value"] = draw(st.one_of(TEXT, st.just("other/base-model")))
    elif kind == "header-config":
        d["value"] = draw(CONFIGS)
    elif kind == "header-offset":
        d["value"] = draw(st.integers(1, 2**64 - 1))
    elif kind == "header-file":
        d["value"] = draw(st.one_of(TEXT, st.sampled_from(["../adapter_model.safetensors", "x.bin"])))
    elif kind == "trailer":
        d["value"] = (draw(UINT64), draw(TEXT))
    elif kind == "random":
        d["value"] = draw(st.lists(RANDOM_CHUNKS, max_size=6))
    return d


def damaged(chunks: list[M.MergeChunk], d: dict) -> list[M.MergeChunk]:
    """A copy of ``chunks`` with the damage ``d`` done to it."""
    out = [M.MergeChunk.FromString(c.SerializeToString()) for c in chunks]
    header = next(c.header for c in out if c.WhichOneof("item") == "header")
    kind, i, at, value = d["kind"], d["i"], d["d"], d.get("value")
    if kind == "drop":
        del out[i]
    elif kind == "duplicate":
        out.insert(i, out[i])
    elif kind == "swap":
        out[i], out[d["j"]] = out[d["j"]], out[i]
    elif kind == "truncate":
        out = out[:i]
    elif kind == "flip-byte":
        raw = bytearray(out[at].data.data)
        raw[d["byte"] % len(raw)] ^= d["xor"]
        out[at].data.data = bytes(raw)
    elif kind == "data-offset":
        out[at].data.offset = out[at].data.offset + value if value in (-1, 1) else value
    elif kind == "extra-data":
        out.insert(len(out) - 1, M.MergeChunk(data=M.DataChunk(offset=header.total_bytes, data=value)))
    elif kind == "second-header":
        out.insert(at, M.MergeChunk(header=header))
    elif kind == "header-total":
        header.total_bytes = header.total_bytes + value if value in (-1, 1) else value
    elif kind == "header-sha":
        header.sha256 = value
    elif kind == "header-key":
        header.merge_key = value
    elif kind == "header-rank":
        header.rank = value
    elif kind == "header-base":
        header.base_model = value
    elif kind == "header-config":
        header.adapter_config_json = value
    elif kind == "header-offset":
        header.offset = value
    elif kind == "header-file":
        header.file_name = value
    elif kind == "trailer":
        out[-1].trailer.total_bytes, out[-1].trailer.sha256 = value
    elif kind == "random":
        out = value
    return out


def test_fuzz_load_adapter(inference_fuzz, pushed_stream: list[M.MergeChunk]) -> None:
    stack, stub = inference_fuzz
    data = b"".join(c.data.data for c in pushed_stream if c.WhichOneof("item") == "data")
    digest = hashlib.sha256(data).hexdigest()
    outcomes: collections.Counter[str] = collections.Counter()

    data_at = [i for i, c in enumerate(pushed_stream) if c.WhichOneof("item") == "data"]

    @settings(FUZZ, max_examples=400)
    @given(damage=damages(len(pushed_stream), data_at))
    def push(damage: dict) -> None:
        kind, chunks = damage["kind"], damaged(pushed_stream, damage)
        try:
            reply = stub.LoadAdapter(iter(chunks), metadata=stack.inference_admin_metadata, timeout=60)
        except grpc.RpcError as e:
            check_error(e, PUSH_FIELDS, chunks)
            outcomes[f"{kind}:{e.code().name}"] += 1
            assert kind != "none", e.details()
            return
        outcomes[f"{kind}:OK"] += 1
        # Whatever was accepted is the untouched adapter, whole.
        lora_int_id = listing(stack).get(reply.merge_key)
        if lora_int_id is not None:  # (it may already have been evicted by a later push)
            [folder] = [f for f in stack.run_dir().iterdir() if f.name.startswith(f"{lora_int_id:08d}-")]
            assert hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest() == digest

    push()
    assert outcomes["none:OK"] > 0 or not any(k.startswith("none:") for k in outcomes), outcomes
    assert any(not k.endswith(":OK") for k in outcomes), outcomes


def test_fuzz_unload_and_list(inference_fuzz) -> None:
    stack, stub = inference_fuzz

    def names() -> dict[str, str]:
        reply = stub.ListAdapters(I.ListAdaptersRequest(), metadata=stack.inference_metadata, timeout=30)
        return {a.merge_key: a.name for a in reply.adapters}

    @settings(FUZZ, max_examples=300)
    @given(merge_key=st.one_of(st.just(""), TEXT), name=st.one_of(st.just(""), TEXT))
    def unload(merge_key: str, name: str) -> None:
        before = names()
        request = I.UnloadAdapterRequest(merge_key=merge_key, name=name)
        try:
            reply = stub.UnloadAdapter(request, metadata=stack.inference_admin_metadata, timeout=30)
        except grpc.RpcError as e:
            check_error(e, ("merge_key", "name"), [request])
            assert names() == before
            return
        # Unloaded exactly when the key or name was listed (earlier pushes may carry odd keys).
        named = merge_key in before if merge_key else name in before.values()
        assert reply.unloaded == named
        expected = {k: v for k, v in before.items() if k != merge_key and v != name} if named else before
        assert names() == expected

    unload()


def test_temperature_above_vllms_bound_is_invalid_argument(hardened_stack: Stack) -> None:
    """vLLM takes temperatures in [0, 2]; 2.5 must be refused by the service as INVALID_ARGUMENT on
    sampling.temperature (it used to reach vLLM and come back INTERNAL)."""
    stack = hardened_stack
    request = I.GenerateRequest(prompt="hi", sampling=I.SamplingParams(max_tokens=4, temperature=2.5))
    with pytest.raises(grpc.RpcError) as info:
        stack.inference_stub().Generate(request, metadata=stack.inference_metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "sampling.temperature" in info.value.details() and "2.5" in info.value.details()
    check_error(info.value, ("sampling.temperature",), [request])


def test_forged_pushes_never_change_what_a_spec_returns(inference_fuzz, pushed_stream) -> None:
    """Pushes of other weights claiming the merge key Plan returned for a spec (or any key) are filed
    under their own content key; a Generate for the spec still gets the merge service's adapter."""
    stack, stub = inference_fuzz
    spec = M.MergeSpec(adapters=[M.AdapterRef(id="a", weight=0.5), M.AdapterRef(id="b", weight=0.5)])
    plan = M.MergeRequest(spec=normalize_spec(spec, MAX_LORA_RANK))
    key = stack.merge_stub().Plan(plan, metadata=stack.merge_metadata, timeout=60).merge_key
    greedy = I.SamplingParams(max_tokens=12, temperature=0)
    request = I.GenerateRequest(prompt="The quick brown fox", merged_adapters=spec, sampling=greedy)
    admin = stack.inference_admin_metadata
    data = b"".join(c.data.data for c in pushed_stream if c.WhichOneof("item") == "data")
    content_key = "pushed:" + hashlib.sha256(data).hexdigest()

    def unload(merge_key: str) -> None:
        stub.UnloadAdapter(I.UnloadAdapterRequest(merge_key=merge_key), metadata=admin, timeout=30)

    unload(key)  # the spec not loaded: the forged push comes first
    real = stub.Generate(request, metadata=stack.inference_metadata, timeout=120)
    assert real.adapter.merge_key == key

    @settings(FUZZ, max_examples=20)
    @given(claim=st.one_of(st.just(key), st.just(content_key), TEXT), first=st.booleans())
    def forge(claim: str, first: bool) -> None:
        if first:
            unload(key)
        forged = [M.MergeChunk() for _ in pushed_stream]
        for f, c in zip(forged, pushed_stream, strict=True):
            f.CopyFrom(c)
        next(c for c in forged if c.WhichOneof("item") == "header").header.merge_key = claim
        reply = stub.LoadAdapter(iter(forged), metadata=admin, timeout=60)
        assert reply.merge_key == content_key != key
        got = stub.Generate(request, metadata=stack.inference_metadata, timeout=120)
        assert got.adapter.merge_key == key and list(got.token_ids) == list(real.token_ids)

    forge()
    unload(content_key)
