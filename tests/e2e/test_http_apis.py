"""The HTTP APIs on the real stack, driven by clients nobody here wrote: the official ``openai`` SDK,
the unmodified ``lorax-client`` from PyPI, and ``curl -N``; answers checked against gRPC and against
transformers + PEFT on the merged adapter."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramerge.v1 import inference_pb2, merge_pb2
from tests.e2e.conftest import RECIPES, ServiceProcess
from tests.e2e.test_inference_e2e import fetch_merged, peft_greedy

pytestmark = pytest.mark.e2e

I = inference_pb2  # noqa: E741
M = merge_pb2
PROMPT = "The quick brown fox"
N = 12
MERGED = {"adapters": [{"id": "a", "weight": 0.7}, {"id": "b", "weight": 0.3}], "merge_strategy": "LINEAR"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def url(inference_service: ServiceProcess) -> str:
    return str(inference_service.extra["http_url"])


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def grpc_spec(body: dict) -> M.MergeSpec:
    from google.protobuf import json_format

    return json_format.ParseDict(body, M.MergeSpec())


def grpc_generate(stub, **kw) -> I.GenerateResponse:
    return stub.Generate(
        I.GenerateRequest(sampling=I.SamplingParams(max_tokens=N, temperature=0), **kw), timeout=120
    )


def test_models_lists_base_and_recipes(client: openai.OpenAI, inference_stub) -> None:
    ids = [m.id for m in client.models.list().data]
    assert set(RECIPES) <= set(ids)
    assert ids[0] == inference_stub.ListAdapters(I.ListAdaptersRequest(), timeout=30).base_model
    recipes = inference_stub.ListRecipes(I.ListRecipesRequest(), timeout=30).recipes
    assert {r.name for r in recipes} == set(RECIPES)


def test_same_tokens_on_openai_lorax_and_grpc_and_logprobs_match_transformers(
    client, url, inference_stub, merge_stub, tiny_llama, tmp_path
) -> None:
    from lorax import Client, MergedAdapters

    ours = grpc_generate(
        inference_stub, prompt=PROMPT, merged_adapters=grpc_spec(MERGED), logprobs=True, top_logprobs=3
    )
    completion = client.completions.create(
        model="",
        prompt=PROMPT,
        max_tokens=N,
        temperature=0,
        logprobs=3,
        extra_body={"merged_adapters": MERGED},
    )
    assert completion.choices[0].text == ours.text
    lp = completion.choices[0].logprobs
    assert lp.tokens == [t.text for t in ours.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ours.logprobs], abs=1e-5)
    assert all(len(t.top_logprobs) == 3 for t in ours.logprobs)
    # OpenAI keys the alternatives by text: byte pieces that decode alike share one entry.
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert completion.usage.completion_tokens == len(ours.token_ids)

    lorax = Client(url, timeout=120)
    merged = MergedAdapters(ids=["a", "b"], weights=[0.7, 0.3], merge_strategy="linear", density=0.0)
    answer = lorax.generate(PROMPT, merged_adapters=merged, max_new_tokens=N, details=True)
    assert answer.generated_text == ours.text
    assert [t.id for t in answer.details.tokens] == list(ours.token_ids)
    assert answer.details.generated_tokens == len(ours.token_ids)

    # The oracle: greedy tokens and log-softmax of transformers + PEFT on the merged adapter.
    merged_dir = tmp_path / "merged"
    fetch_merged(merge_stub, grpc_spec(MERGED), merged_dir)
    assert list(ours.token_ids) == peft_greedy(tiny_llama, merged_dir, PROMPT, N)[: len(ours.token_ids)]
    expected = peft_logprobs(tiny_llama, merged_dir, PROMPT, list(ours.token_ids))
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-3)
    assert [t.logprob for t in answer.details.tokens] == pytest.approx(expected, abs=1e-3)


def peft_logprobs(model_dir: Path, adapter_dir: Path, prompt: str, completion: list[int]) -> list[float]:
    """log_softmax of transformers + PEFT at each completion token (teacher-forced)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32), adapter_dir
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    full = torch.cat([ids, torch.tensor([completion])], dim=1)
    with torch.no_grad():
        logits = model(full).logits[0, ids.shape[1] - 1 : -1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(logp[i, t]) for i, t in enumerate(completion)]


def test_chat_uses_the_template_and_equals_grpc_and_transformers(client, inference_stub, tiny_llama) -> None:
    from transformers import AutoTokenizer

    chat = client.chat.completions.create(
        model="ab-linear",
        messages=MESSAGES,
        max_completion_tokens=N,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    ours = grpc_generate(inference_stub, recipe="ab-linear", messages=[I.ChatMessage(**m) for m in MESSAGES])
    assert chat.choices[0].message.content == ours.text
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == len(ours.token_ids)
    assert all(len(c.top_logprobs) == 2 for c in chat.choices[0].logprobs.content)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(rendered, add_special_tokens=False).input_ids
    assert chat.usage.prompt_tokens == len(prompt_ids)


def test_streams_carry_the_same_text_and_usage(client, base_name) -> None:
    whole = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=N, temperature=0)
    chunks = list(
        client.completions.create(
            model=base_name, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat_whole = client.chat.completions.create(
        model="ab-ties", messages=MESSAGES, max_tokens=N, temperature=0
    )
    chat_chunks = list(
        client.chat.completions.create(
            model="ab-ties", messages=MESSAGES, max_tokens=N, temperature=0, stream=True
        )
    )
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert text == chat_whole.choices[0].message.content
    assert chat_chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_async_client_streams(url: str) -> None:
    async def run() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        parts = []
        stream = await aclient.completions.create(
            model="",
            prompt=PROMPT,
            max_tokens=N,
            temperature=0,
            stream=True,
            extra_body={"merged_adapters": MERGED},
        )
        async for chunk in stream:
            parts.append(chunk.choices[0].text if chunk.choices else "")
        await aclient.close()
        return "".join(parts)

    text = asyncio.run(run())
    sync = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert (
        text
        == sync.completions.create(
            model="", prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"merged_adapters": MERGED}
        )
        .choices[0]
        .text
    )


def test_lorax_client_adapter_id_and_stream(url: str, inference_stub) -> None:
    from lorax import Client

    lorax = Client(url, timeout=120)
    ours = grpc_generate(inference_stub, prompt=PROMPT, adapter_id="a")
    answer = lorax.generate(
        PROMPT, adapter_id="a", max_new_tokens=N, details=True, decoder_input_details=True
    )
    assert answer.generated_text == ours.text
    assert answer.details.finish_reason in ("length", "eos_token")
    assert answer.details.prompt_tokens == len(answer.details.prefill) > 0
    events = list(lorax.generate_stream(PROMPT, adapter_id="a", max_new_tokens=N))
    assert [e.token.id for e in events] == list(ours.token_ids)
    assert "".join(e.token.text for e in events) == ours.text  # streamed text is detokenized incrementally
    assert events[-1].generated_text == ours.text
    assert events[-1].details.generated_tokens == len(ours.token_ids)


def test_curl_sees_raw_server_sent_events(url: str) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps(
        {"model": "ab-linear", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    )
    out = subprocess.run(
        [curl, "-sN", f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    events = [line for line in out.splitlines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data:"))["object"] == "text_completion"


def fresh_ties(weight: float) -> dict:
    """A TIES merge nobody has asked for yet: the merge service builds it, streaming its progress."""
    return {
        "adapters": [{"id": "a", "weight": weight}, {"id": "b", "weight": 1 - weight}],
        "merge_strategy": "TIES",
        "density": 0.5,
    }


def test_streams_report_merge_progress_as_sse_comments_before_the_first_token(url: str, client) -> None:
    """While a new merge is built, a stream carries ``: merge progress: <stage> <done>/<total>``
    comment lines before the first token; SSE parsers (the openai SDK, lorax-client) skip them."""
    from lorax import Client, MergedAdapters

    body = {"model": "", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    body["merged_adapters"] = fresh_ties(0.61)
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    comments = [i for i, line in enumerate(lines) if line.startswith(": merge progress: ")]
    data = [i for i, line in enumerate(lines) if line.startswith("data:")]
    assert comments and max(comments) < min(data), lines[:8]
    stage, counts = lines[comments[-1]].removeprefix(": merge progress: ").split(" ")
    done, total = map(int, counts.split("/"))
    assert stage in ("load", "merge") and 0 <= done <= total and total > 0
    streamed = "".join(json.loads(lines[i].removeprefix("data:"))["choices"][0]["text"] for i in data[:-1])
    whole = client.completions.create(
        model="", prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"merged_adapters": fresh_ties(0.61)}
    )
    assert streamed == whole.choices[0].text

    # The official clients parse such streams as they parse any other.
    spec = fresh_ties(0.62)
    chunks = list(
        client.completions.create(
            model="", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
            extra_body={"merged_adapters": spec},
        )
    )  # fmt: skip
    again = client.completions.create(
        model="", prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"merged_adapters": spec}
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == again.choices[0].text
    chat = list(
        client.chat.completions.create(
            model="", messages=MESSAGES, max_tokens=N, temperature=0, stream=True,
            extra_body={"merged_adapters": fresh_ties(0.63)},
        )
    )  # fmt: skip
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason
    lorax = Client(url, timeout=120)
    merged = MergedAdapters(ids=["a", "b"], weights=[0.64, 0.36], merge_strategy="ties", density=0.5)
    events = list(lorax.generate_stream(PROMPT, merged_adapters=merged, max_new_tokens=N))
    answer = lorax.generate(PROMPT, merged_adapters=merged, max_new_tokens=N)
    assert events[-1].generated_text == answer.generated_text


# -- bad input: each API's own error shape and code, never a 500, nothing loaded ------------------


def test_openai_errors(client, url, inference_stub) -> None:
    before = {a.merge_key for a in inference_stub.ListAdapters(I.ListAdaptersRequest(), timeout=30).adapters}
    # Not under the adapter root, and the hub is offline in tests: the merge service says which.
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as e:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    assert e.value.body["param"] == "model"
    assert "no-such-adapter" in e.value.body["message"]
    ties = {"ids": ["a", "b"], "merge_strategy": "ties"}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="", prompt=PROMPT, max_tokens=2, extra_body={"merged_adapters": ties})
    assert e.value.body["param"] == "merged_adapters.density"
    assert "density" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="", prompt=PROMPT, max_tokens=100000)
    assert e.value.body["param"] == "max_tokens"
    raw = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(
        f"{url}/v1/completions", content=b"x" * (17 * 2**20), headers={"Content-Type": "application/json"}
    )
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    no_template = httpx.post(f"{url}/v1/chat/completions", json={"messages": []})
    assert no_template.status_code == 400
    after = {a.merge_key for a in inference_stub.ListAdapters(I.ListAdaptersRequest(), timeout=30).adapters}
    assert after == before


def test_lorax_errors(url: str) -> None:
    from lorax import Client, MergedAdapters
    from lorax.errors import ValidationError

    lorax = Client(url, timeout=120)
    with pytest.raises(ValidationError, match="density"):
        lorax.generate(
            PROMPT,
            merged_adapters=MergedAdapters(
                ids=["a", "b"], weights=[1, 1], merge_strategy="ties", density=0.0
            ),
        )
    with pytest.raises(ValidationError, match="no-such"):
        lorax.generate(PROMPT, adapter_id="no-such", max_new_tokens=2)
    raw = httpx.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 0}})
    assert raw.status_code == 422 and raw.json()["error_type"] == "validation"
    assert "max_new_tokens" in raw.json()["error"]
    stream = httpx.post(f"{url}/generate_stream", json={"parameters": {}})
    assert stream.status_code == 422 and "inputs" in stream.json()["error"]


# -- fuzz: random bodies never give a 500, always the API's error shape, and the engine lives on ---

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
_OPENAI_KEYS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "logprobs",
    "top_logprobs",
    "stream",
    "n",
    "merged_adapters",
    "stream_options",
]
_LORAX_KEYS = [
    "adapter_id",
    "adapter_source",
    "merged_adapters",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "details",
    "return_full_text",
]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=st.dictionaries(st.sampled_from(_OPENAI_KEYS), _values, max_size=6),
)
def test_fuzz_openai_bodies(url: str, path: str, body: dict) -> None:
    body.setdefault("max_tokens", 2)
    r = httpx.post(url + path, content=json.dumps(body, allow_nan=True), timeout=120)
    assert r.status_code < 500 or r.status_code == 503, r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) >= {"message", "type", "param"}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/", "/generate", "/generate_stream"]),
    params=st.dictionaries(st.sampled_from(_LORAX_KEYS), _values, max_size=5),
)
def test_fuzz_lorax_bodies(url: str, path: str, params: dict) -> None:
    params.setdefault("max_new_tokens", 2)
    # Encoded here, as the OpenAI fuzzer does: httpx's json= refuses the NaN and ±inf the values may hold.
    body = json.dumps({"inputs": PROMPT, "parameters": params}, allow_nan=True)
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code < 500 or r.status_code == 503, r.text
    if r.status_code != 200:
        assert set(r.json()) == {"error", "error_type"}


def test_engine_serves_after_the_fuzzers(client: openai.OpenAI) -> None:
    assert (
        client.completions.create(model="ab-linear", prompt=PROMPT, max_tokens=2).choices[0].text is not None
    )
