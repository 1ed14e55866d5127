"""The Python client and the ``loramerge`` command against both real services (vLLM on the tiny
Llama). Oracle: transformers + PEFT greedy generation with the merged adapter the client fetched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramerge import errors as E
from loramerge_client import (
    Adapter,
    InferenceClient,
    MergeClient,
    MergedAdapters,
    SamplingParams,
)
from loramerge_client.cli import main

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"
SPEC = MergedAdapters(ids=["a", "e"], weights=[0.6, 0.4], merge_strategy="ties", density=0.5)
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def inference(inference_service):
    with InferenceClient(inference_service.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def merge(merge_service):
    with MergeClient(merge_service.address, timeout=120) as client:
        yield client


def _peft_greedy(model_dir: Path, adapter_dir: Path, prompt: str, n: int) -> list[int]:
    """Greedy token ids from transformers + PEFT (an implementation independent of vLLM)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_generate_stream_load_and_unload(
    inference: InferenceClient, merge: MergeClient, tiny_llama: Path, tmp_path: Path
) -> None:
    resp = inference.generate(PROMPT, SPEC, GREEDY)
    assert resp.completion_tokens == 10 and resp.adapter.merge_key

    streamed = list(inference.generate_stream(PROMPT, SPEC, GREEDY))
    assert "".join(m.text for m in streamed) == resp.text
    assert [t for m in streamed for t in m.token_ids] == list(resp.token_ids)
    assert streamed[0].adapter.already_loaded

    fetched = merge.merge(SPEC, output_dir=tmp_path / "merged")
    assert fetched.merge_key == resp.adapter.merge_key
    assert _peft_greedy(tiny_llama, tmp_path / "merged", PROMPT, 10) == list(resp.token_ids)

    keys = [a.merge_key for a in inference.list_adapters().adapters]
    assert resp.adapter.merge_key in keys
    assert inference.unload_adapter(resp.adapter.merge_key) is True
    assert resp.adapter.merge_key not in [a.merge_key for a in inference.list_adapters().adapters]

    pushed = inference.load_adapter(fetched)  # a push is filed under its content key, not the merge key
    assert pushed.merge_key == f"pushed:{fetched.sha256}" and not pushed.already_loaded
    by_key = inference.generate(PROMPT, sampling=GREEDY, merge_key=pushed.merge_key)
    assert by_key.token_ids == resp.token_ids
    assert inference.unload_adapter(pushed.merge_key)


def test_generate_stream_reports_merge_progress_to_the_callback(inference: InferenceClient) -> None:
    """A merge nobody asked for yet: on_progress hears the merge service's progress before the first
    token, the iterator yields only text messages, the same tokens as unary."""
    fresh = MergedAdapters(ids=["b", "e"], weights=[0.35, 0.65], merge_strategy="dare_ties", density=0.6)
    heard = []
    streamed = list(inference.generate_stream(PROMPT, fresh, GREEDY, on_progress=heard.append))
    assert heard and all(0 <= p.done <= p.total for p in heard)
    assert not any(m.HasField("merge_progress") for m in streamed) and not streamed[0].adapter.already_loaded
    unary = inference.generate(PROMPT, fresh, GREEDY)
    assert [t for m in streamed for t in m.token_ids] == list(unary.token_ids)


def test_errors_from_the_inference_service(inference: InferenceClient) -> None:
    with pytest.raises(E.NotFound):
        inference.generate(PROMPT, Adapter("no-such-adapter", source="local"), GREEDY)
    with pytest.raises(E.InvalidArgument) as info:
        inference.generate(PROMPT, MergedAdapters(ids=["a", "e"], merge_strategy="ties"), GREEDY)
    assert any("density" in v.field for v in info.value.violations)
    with pytest.raises(E.FailedPrecondition):  # d names another base model
        inference.generate(PROMPT, MergedAdapters(ids=["a", "d"]), GREEDY)
    with pytest.raises(E.NotFound):
        inference.generate(PROMPT, sampling=GREEDY, merge_key="never-loaded")
    assert inference.generate(PROMPT, sampling=GREEDY).completion_tokens == 10  # the engine lives on


def test_cli_generate_and_health(
    inference_service, merge_service, inference: InferenceClient, capsys
) -> None:
    expected = inference.generate(PROMPT, "a", GREEDY).text
    addr = ["--inference-addr", inference_service.address]
    code = main(["generate", PROMPT, "-a", "a", "-n", "10", "--ignore-eos", *addr])
    out, _ = capsys.readouterr()
    assert (code, out) == (0, expected + "\n")

    code = main(["generate", PROMPT, "-a", "a", "-n", "10", "--ignore-eos", "--stream", "--json", *addr])
    lines = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert code == 0 and "".join(m.get("text", "") for m in lines) == expected

    code = main(["generate", PROMPT, "-a", "a", "-a", "e", "--strategy", "ties", *addr])  # no density
    assert code == 2 and "density" in capsys.readouterr()[1]

    code = main(["health", "--merge-addr", merge_service.address, *addr])
    assert code == 0 and capsys.readouterr()[0].count("SERVING") == 2
