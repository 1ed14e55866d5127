"""The inference service end to end: real merge service, real vLLM, tiny Llama built locally.

Oracles: transformers + PEFT greedy generation on the same merged adapter files (fetched straight
from the merge service, same merge key), and PEFT on an original adapter with B scaled by hand for
the single-adapter weight. Shared fixtures are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_status import rpc_status
from safetensors.torch import load_file, save_file

from inference_service.request_specs import normalize_spec
from loramerge.errors import violations_from_status
from loramerge.v1 import inference_pb2, merge_pb2
from tests.e2e.conftest import MAX_LORA_RANK, MergeServiceProcess, ServiceProcess
from tests.factories import make_adapter

pytestmark = pytest.mark.e2e

I = inference_pb2  # noqa: E741
M = merge_pb2
PROMPTS = ["The quick brown fox", "Once upon a time, there was"]
MAX_TOKENS = 24
MERGE_CALLS = ("loramerge_rpc_requests_total", {"method": "Merge"})


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> I.SamplingParams:
    return I.SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def spec(*pairs: tuple[str, float], strategy: int = M.LINEAR, **kw) -> M.MergeSpec:
    return M.MergeSpec(
        adapters=[M.AdapterRef(id=i, weight=w) for i, w in pairs], merge_strategy=strategy, **kw
    )


def generate(stub, prompt: str = PROMPTS[0], timeout: float = 120, **kw) -> I.GenerateResponse:
    return stub.Generate(I.GenerateRequest(prompt=prompt, sampling=greedy(), **kw), timeout=timeout)


# -- the PEFT oracle -------------------------------------------------------------------------------


def fetch_merged(merge_stub, s: M.MergeSpec, out: Path) -> str:
    """Write the merge service's adapter for ``s`` (as the inference service asks for it) to ``out``."""
    header, data = None, bytearray()
    for chunk in merge_stub.Merge(M.MergeRequest(spec=normalize_spec(s, MAX_LORA_RANK)), timeout=120):
        if chunk.HasField("header"):
            header = chunk.header
        elif chunk.HasField("data"):
            data += chunk.data.data
    assert header is not None and hashlib.sha256(data).hexdigest() == header.sha256
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(header.adapter_config_json)
    (out / "adapter_model.safetensors").write_bytes(bytes(data))
    return header.merge_key


def peft_greedy(
    model_dir: Path, adapter_dir: Path | None, prompt: str, max_tokens: int = MAX_TOKENS
) -> list[int]:
    """Greedy completion token ids from transformers (+ PEFT when ``adapter_dir`` is given)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def scaled_copy(adapter: Path, weight: float, out: Path) -> Path:
    """``adapter`` with every B multiplied by ``weight``: ΔW' = weight · ΔW, computed by hand."""
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file(
        {k: v * weight if ".lora_B." in k else v for k, v in tensors.items()},
        str(out / "adapter_model.safetensors"),
    )
    return out


def run_dir(inference_service: ServiceProcess) -> Path:
    (run,) = Path(str(inference_service.extra["adapter_dir"])).glob("run-*")
    return run


def adapter_folders(inference_service: ServiceProcess) -> set[str]:
    return {
        p.name for p in run_dir(inference_service).iterdir() if re.fullmatch(r"\d{8}-[0-9a-f]{8}", p.name)
    }


def listed(stub) -> I.ListAdaptersResponse:
    return stub.ListAdapters(I.ListAdaptersRequest(), timeout=30)


# -- correctness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "merged",
    [
        pytest.param(spec(("a", 0.6), ("b", 0.4)), id="linear"),
        pytest.param(spec(("a", 1.0), ("e", 0.5), strategy=M.TIES, density=0.7), id="ties-svd"),
    ],
)
def test_merged_adapter_output_equals_peft(inference_stub, merge_stub, tiny_llama, tmp_path, merged):
    for prompt in PROMPTS:
        got = generate(inference_stub, prompt, merged_adapters=merged)
        assert got.finish_reason in (I.STOP, I.LENGTH)
        assert got.completion_tokens == len(got.token_ids) > 0
        oracle_dir = tmp_path / f"merged-{len(prompt)}"
        key = fetch_merged(merge_stub, merged, oracle_dir)
        assert got.adapter.merge_key == key
        assert list(got.token_ids) == peft_greedy(tiny_llama, oracle_dir, prompt)


def test_base_and_single_weighted_adapter_equal_peft(inference_stub, tiny_llama, adapter_root, tmp_path):
    base = generate(inference_stub)
    assert not base.HasField("adapter") or not base.adapter.name
    assert list(base.token_ids) == peft_greedy(tiny_llama, None, PROMPTS[0])

    full = generate(inference_stub, adapter_id="a")
    assert list(full.token_ids) == peft_greedy(tiny_llama, adapter_root / "a", PROMPTS[0])

    half = generate(inference_stub, adapter_id="a", adapter_weight=0.5)
    oracle = scaled_copy(adapter_root / "a", 0.5, tmp_path / "a-half")
    assert list(half.token_ids) == peft_greedy(tiny_llama, oracle, PROMPTS[0])
    assert half.adapter.merge_key != full.adapter.merge_key


def test_different_specs_give_different_outputs(inference_stub):
    outputs = {
        "base": generate(inference_stub),
        "a": generate(inference_stub, adapter_id="a"),
        "b": generate(inference_stub, adapter_id="b"),
        "a+b": generate(inference_stub, merged_adapters=spec(("a", 0.5), ("b", 0.5))),
        "a+b ties": generate(
            inference_stub, merged_adapters=spec(("a", 0.5), ("b", 0.5), strategy=M.TIES, density=0.5)
        ),
    }
    tokens = {name: tuple(r.token_ids) for name, r in outputs.items()}
    assert len(set(tokens.values())) == len(tokens), tokens
    keys = [r.adapter.merge_key for name, r in outputs.items() if name != "base"]
    assert len(set(keys)) == len(keys)


def test_streaming_gives_the_same_tokens_as_unary(inference_stub):
    request = I.GenerateRequest(
        prompt=PROMPTS[1], sampling=greedy(), merged_adapters=spec(("b", 0.8), ("e", 0.3))
    )
    unary = inference_stub.Generate(request, timeout=120)
    messages = list(inference_stub.GenerateStream(request, timeout=120))
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert messages[0].adapter.merge_key == unary.adapter.merge_key
    assert messages[-1].finish_reason == unary.finish_reason != I.FINISH_REASON_UNSPECIFIED
    assert all(m.finish_reason == I.FINISH_REASON_UNSPECIFIED for m in messages[:-1])


def test_stream_reports_merge_progress_before_the_first_token_when_asked(inference_stub):
    """A new merge (the merge service builds it): with merge_progress, messages carrying only the
    merge service's progress come first; then the same tokens as unary, the adapter on the first."""
    merged = spec(("a", 0.45), ("c", 0.55), strategy=M.TIES, density=0.5)
    request = I.GenerateRequest(
        prompt=PROMPTS[0], sampling=greedy(), merged_adapters=merged, merge_progress=True, request_id="mp"
    )
    messages = list(inference_stub.GenerateStream(request, timeout=120))
    progress = [m for m in messages if m.HasField("merge_progress")]
    tokens = messages[len(progress) :]
    assert progress, "no merge progress for a merge the merge service had to build"
    assert not any(m.HasField("merge_progress") for m in tokens)  # all before the first token
    assert all(m.request_id == "mp" and not m.token_ids and not m.text for m in progress)
    assert {m.merge_progress.stage for m in progress} <= {"load", "merge"}
    assert all(0 <= m.merge_progress.done <= m.merge_progress.total for m in progress)
    unary = inference_stub.Generate(request, timeout=120)
    assert [t for m in tokens for t in m.token_ids] == list(unary.token_ids)
    assert tokens[0].adapter.merge_key == unary.adapter.merge_key and not tokens[0].adapter.already_loaded
    # Loaded now: nothing to merge, no progress.
    again = list(inference_stub.GenerateStream(request, timeout=120))
    assert not any(m.HasField("merge_progress") for m in again) and again[0].adapter.already_loaded


# -- caching and concurrency ------------------------------------------------------------------------


def test_repeated_spec_does_not_reach_the_merge_service(inference_stub, inference_service, merge_service):
    s = spec(("c", 0.7), ("b", 0.2))
    first = generate(inference_stub, merged_adapters=s)
    assert not first.adapter.already_loaded
    assert first.adapter.merge_ms > 0 and first.adapter.load_ms > 0
    merges = merge_service.metric(*MERGE_CALLS)
    loaded_hits = inference_service.metric("loramerge_inference_adapter_lookups_total", {"result": "loaded"})

    again = generate(inference_stub, merged_adapters=s)
    # LoRAX-style shorthand for the same merge: same fingerprint once normalised.
    shorthand = generate(inference_stub, merged_adapters=M.MergeSpec(ids=["c", "b"], weights=[0.7, 0.2]))

    assert merge_service.metric(*MERGE_CALLS) == merges
    assert inference_service.metric("loramerge_inference_adapter_lookups_total", {"result": "loaded"}) == (
        loaded_hits + 2
    )
    for r in (again, shorthand):
        assert r.adapter.already_loaded and r.adapter.merge_key == first.adapter.merge_key
        assert r.adapter.merge_ms == r.adapter.transfer_ms == r.adapter.load_ms == 0
        assert list(r.token_ids) == list(first.token_ids)


def test_concurrent_specs_and_base_requests_match_their_solo_outputs(
    inference_stub, inference_service, merge_service
):
    specs = {
        "c": spec(("c", 0.9)),
        "a+c ties": spec(("a", 0.5), ("c", 0.5), strategy=M.TIES, density=0.6),
        "b+e dare": spec(("b", 1.0), ("e", 0.4), strategy=M.DARE_LINEAR, density=0.7, seed=3),
    }
    jobs = [(name, prompt) for name in [*specs, "base"] for prompt in PROMPTS for _ in range(2)]
    merges = merge_service.metric(*MERGE_CALLS)
    start = threading.Barrier(len(jobs))

    def run(job: tuple[str, str]) -> I.GenerateResponse:
        name, prompt = job
        start.wait(30)
        return generate(
            inference_stub, prompt, **({} if name == "base" else {"merged_adapters": specs[name]})
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))

    # Each new spec was fetched once, however many requests asked for it at the same time.
    assert merge_service.metric(*MERGE_CALLS) == merges + len(specs)
    keys = {
        name: {r.adapter.merge_key for (n, _), r in zip(jobs, together, strict=True) if n == name}
        for name in specs
    }
    assert all(len(k) == 1 for k in keys.values()), keys
    loaded_keys = [a.merge_key for a in listed(inference_stub).adapters]
    for (key,) in keys.values():
        assert loaded_keys.count(key) == 1

    for (name, prompt), r in zip(jobs, together, strict=True):
        alone = generate(
            inference_stub, prompt, **({} if name == "base" else {"merged_adapters": specs[name]})
        )
        assert list(r.token_ids) == list(alone.token_ids), (name, prompt)


# -- errors leave the engine serving ----------------------------------------------------------------


def push(
    stub, adapter: Path, *, merge_key: str, data: bytes | None = None, sha256: str | None = None, **header
):
    """LoadAdapter with ``adapter``'s files (or ``data``), in 64 KiB chunks."""
    data = (adapter / "adapter_model.safetensors").read_bytes() if data is None else data
    head = M.MergeHeader(
        merge_key=merge_key,
        adapter_config_json=(adapter / "adapter_config.json").read_text(),
        total_bytes=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        **header,
    )

    def chunks():
        yield M.MergeChunk(header=head)
        for off in range(0, len(data), 65536):
            yield M.MergeChunk(data=M.DataChunk(offset=off, data=data[off : off + 65536]))
        yield M.MergeChunk(trailer=M.MergeTrailer(total_bytes=len(data), sha256=head.sha256))

    return stub.LoadAdapter(chunks(), timeout=60)


def assert_code(code: grpc.StatusCode, fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    assert info.value.code() == code, info.value.details()
    return info.value


def test_bad_adapters_are_refused_and_the_next_request_succeeds(
    inference_stub, inference_service, tiny_llama, adapter_root, tmp_path
):
    before = {a.merge_key for a in listed(inference_stub).adapters}
    folders = adapter_folders(inference_service)
    a = adapter_root / "a"
    weights = (a / "adapter_model.safetensors").read_bytes()

    err = assert_code(
        grpc.StatusCode.INVALID_ARGUMENT, push, inference_stub, a, merge_key="bad-sha", sha256="0" * 64
    )
    assert "sha256" in err.details()
    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage" + weights[:100]
    err = assert_code(
        grpc.StatusCode.INVALID_ARGUMENT, push, inference_stub, a, merge_key="bad-file", data=garbage
    )
    assert "vLLM rejected" in err.details()
    big = make_adapter(tmp_path / "r32", tiny_llama, r=32, alpha=32, seed=9)
    err = assert_code(grpc.StatusCode.FAILED_PRECONDITION, push, inference_stub, big, merge_key="too-big")
    assert "rank 32 exceeds the engine's max_lora_rank 16" in err.details()
    err = assert_code(
        grpc.StatusCode.FAILED_PRECONDITION, push, inference_stub, adapter_root / "d", merge_key="other"
    )
    assert "other/base-model" in err.details()
    err = assert_code(grpc.StatusCode.FAILED_PRECONDITION, generate, inference_stub, adapter_id="d")
    assert "differs from the served model" in err.details()

    # Nothing half written stays loaded or on disk, and the engine still serves.
    assert {a.merge_key for a in listed(inference_stub).adapters} == before
    assert adapter_folders(inference_service) == folders
    assert generate(inference_stub).completion_tokens > 0
    assert generate(inference_stub, adapter_id="a").completion_tokens > 0


def test_oversized_rank_is_refused_and_the_next_request_succeeds(inference_stub):
    too_big = spec(("a", 1.0), ("e", 1.0), target_rank=32)
    err = assert_code(grpc.StatusCode.FAILED_PRECONDITION, generate, inference_stub, merged_adapters=too_big)
    assert "merged_adapters.target_rank 32" in err.details()
    assert [v.field for v in violations_from_status(rpc_status.from_call(err))] == [
        "merged_adapters.target_rank"
    ]
    ok = generate(inference_stub, merged_adapters=spec(("a", 1.0), ("e", 1.0), target_rank=16))
    assert ok.adapter.rank == 16 and ok.completion_tokens > 0


def test_request_errors_name_the_field(inference_stub):
    err = assert_code(
        grpc.StatusCode.INVALID_ARGUMENT, generate, inference_stub, adapter_id="a", merge_key="k"
    )
    assert "adapter_id, merge_key" in err.details()
    assert_code(grpc.StatusCode.INVALID_ARGUMENT, generate, inference_stub, prompt="")
    err = assert_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        inference_stub.Generate,
        I.GenerateRequest(prompt="x", sampling=I.SamplingParams(temperature=-1)),
    )
    assert "sampling.temperature" in err.details() and "-1" in err.details()
    err = assert_code(
        grpc.StatusCode.INVALID_ARGUMENT, generate, inference_stub, prompt="The quick brown fox " * 200
    )
    assert "maximum context length is 512" in err.details()
    assert [v.field for v in violations_from_status(rpc_status.from_call(err))] == ["prompt"]
    err = assert_code(grpc.StatusCode.NOT_FOUND, generate, inference_stub, merge_key="no-such-key")
    assert "no-such-key" in err.details()
    err = assert_code(
        grpc.StatusCode.NOT_FOUND,
        generate,
        inference_stub,
        adapter_id="no-such-adapter",
        adapter_source=M.LOCAL,
    )
    assert "no-such-adapter" in err.details()
    assert [v.field for v in violations_from_status(rpc_status.from_call(err))] == ["adapter_id"]


# -- registry lifecycle -----------------------------------------------------------------------------


def test_push_use_unload(inference_stub, inference_service, adapter_root, tiny_llama):
    loaded = push(inference_stub, adapter_root / "b", merge_key="pushed-b")
    assert not loaded.already_loaded and loaded.name
    # The claimed key is ignored: a pushed adapter is filed under the sha256 of its bytes.
    digest = hashlib.sha256((adapter_root / "b" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert loaded.merge_key == f"pushed:{digest}"
    assert push(inference_stub, adapter_root / "b", merge_key="another-claim").already_loaded
    assert_code(grpc.StatusCode.NOT_FOUND, generate, inference_stub, merge_key="pushed-b")
    r = generate(inference_stub, merge_key=loaded.merge_key)
    assert r.adapter.name == loaded.name and r.adapter.already_loaded
    assert list(r.token_ids) == peft_greedy(tiny_llama, adapter_root / "b", PROMPTS[0])
    folders = adapter_folders(inference_service)

    assert inference_stub.UnloadAdapter(I.UnloadAdapterRequest(name=loaded.name), timeout=30).unloaded
    unload_again = I.UnloadAdapterRequest(merge_key=loaded.merge_key)
    assert not inference_stub.UnloadAdapter(unload_again, timeout=30).unloaded
    assert_code(grpc.StatusCode.NOT_FOUND, generate, inference_stub, merge_key=loaded.merge_key)
    assert len(adapter_folders(inference_service)) == len(folders) - 1


def test_least_recently_used_adapters_are_evicted_from_vllm_and_disk(
    inference_stub, inference_service, tiny_llama, tmp_path
):
    bound = listed(inference_stub).max_loaded
    keys = []  # pushed adapters are filed under the sha256 of their bytes, whatever the header claims
    for i in range(bound + 2):
        pushed = push(
            inference_stub,
            make_adapter(tmp_path / f"evict-{i}", tiny_llama, r=4, alpha=8, seed=100 + i),
            merge_key=f"evict-{i}",
        )
        keys.append(pushed.merge_key)
    now = listed(inference_stub)
    assert len(now.adapters) == bound
    assert len(adapter_folders(inference_service)) == bound
    loaded = {a.merge_key for a in now.adapters}
    assert keys[0] not in loaded and keys[1] not in loaded and set(keys[2:]) <= loaded
    assert_code(grpc.StatusCode.NOT_FOUND, generate, inference_stub, merge_key=keys[0])
    # An evicted spec comes back on demand.
    assert generate(inference_stub, merge_key=keys[-1]).completion_tokens > 0
    assert inference_service.metric("loramerge_inference_adapter_evictions_total", {"reason": "lru"}) >= 2


def test_client_cancellation_aborts_the_vllm_request(inference_stub, inference_service):
    def length_finished() -> float:
        return inference_service.metric(
            "loramerge_inference_generations_total", {"kind": "base", "finish_reason": "length"}
        )

    # The tiny model can stream all 480 tokens before the client's cancel reaches the server (the
    # engine's threads spin on both cores): such an attempt ends finished, proves nothing, and is
    # repeated. Every attempt must end one way or the other, and one must be aborted.
    outcomes = []
    for _ in range(5):
        aborted, finished = inference_service.metric("loramerge_inference_aborted_total"), length_finished()
        call = inference_stub.GenerateStream(
            I.GenerateRequest(prompt=PROMPTS[0], sampling=I.SamplingParams(max_tokens=480, ignore_eos=True)),
            timeout=120,
        )
        next(call)
        call.cancel()
        deadline = time.monotonic() + 30
        while True:
            if inference_service.metric("loramerge_inference_aborted_total") >= aborted + 1:
                outcomes.append("aborted")
                break
            if length_finished() > finished:
                outcomes.append("finished first")
                break
            assert time.monotonic() < deadline, "the generation was neither aborted nor finished"
            time.sleep(0.2)
        if outcomes[-1] == "aborted":
            break
    assert outcomes[-1] == "aborted", outcomes
    finished = length_finished()
    assert generate(inference_stub).finish_reason in (I.STOP, I.LENGTH)
    assert (
        inference_service.metric(
            "loramerge_inference_generations_total", {"kind": "base", "finish_reason": "length"}
        )
        <= finished + 1
    )


# -- the merge service goes away ------------------------------------------------------------------


def test_merge_service_down_gives_unavailable_while_base_and_loaded_keep_working(
    inference_stub, inference_service, merge_service: MergeServiceProcess
):
    loaded = spec(("e", 0.9), ("b", 0.1))
    before = generate(inference_stub, merged_adapters=loaded)
    merge_service.stop()
    try:
        t0 = time.monotonic()
        err = assert_code(
            grpc.StatusCode.UNAVAILABLE, generate, inference_stub, merged_adapters=spec(("e", 0.2)), timeout=4
        )
        assert time.monotonic() - t0 < 4
        assert "merge service" in err.details() and "unavailable" in err.details()
        assert (
            inference_service.metric("loramerge_inference_merge_retries_total", {"code": "UNAVAILABLE"}) >= 2
        )
        assert generate(inference_stub).completion_tokens > 0
        again = generate(inference_stub, merged_adapters=loaded)
        assert again.adapter.already_loaded and list(again.token_ids) == list(before.token_ids)
    finally:
        merge_service.restart()
    # Back: a new spec is fetched again (the client reconnects on its own).
    assert generate(inference_stub, merged_adapters=spec(("e", 0.2))).completion_tokens > 0


# -- the vLLM engine dies -------------------------------------------------------------------------


def engine_core(pid: int):
    """The vLLM engine core child process of the service ``pid`` (vLLM titles it VLLM::EngineCore)."""
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no EngineCore child under pid {pid}")


# It ends the session's inference service, so it must run after every test that uses it: the
# stops_a_service marker sorts it to the end (it costs no vLLM start of its own).
@pytest.mark.stops_a_service
def test_engine_core_death_fails_streams_and_exits_non_zero(inference_stub, inference_service):
    import psutil

    proc = inference_service.proc
    assert proc is not None and proc.poll() is None
    family = psutil.Process(proc.pid).children(recursive=True)
    call = inference_stub.GenerateStream(
        I.GenerateRequest(prompt=PROMPTS[0], sampling=I.SamplingParams(max_tokens=480, ignore_eos=True)),
        timeout=120,
    )
    next(call)
    engine_core(proc.pid).kill()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
        # The tiny model can finish all 480 tokens before the kill lands: then a new call must fail.
        for _ in inference_stub.GenerateStream(I.GenerateRequest(prompt=PROMPTS[0]), timeout=60):
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert proc.wait(60) == 3  # EXIT_ENGINE_DIED: the pod is restarted
    assert time.monotonic() - t0 < 60
    log = inference_service.log_text()
    assert "the vLLM engine has died: health is NOT_SERVING" in log
    assert "loramerge-inference-service: the vLLM engine has died" in log
    assert not run_dir_exists(inference_service)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"children left behind: {alive}"


def run_dir_exists(inference_service: ServiceProcess) -> bool:
    adapter_dir = Path(str(inference_service.extra["adapter_dir"]))
    return any(adapter_dir.glob(f"run-{inference_service.proc.pid}-*"))
