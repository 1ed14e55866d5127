"""The tiny model and adapter factories load in transformers and PEFT and are deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.factories import lora_delta, make_adapter, make_tiny_llama


def test_tiny_llama_loads_and_generates(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok("hello world", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == "hello world"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.head_dim == 32
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_adapter_delta_matches_peft(tiny_llama: Path, adapter_root: Path) -> None:
    """lora_delta (the oracle helper) agrees with PEFT's own merged weights, for rsLoRA too."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    module = "model.layers.1.mlp.down_proj"
    w0 = base.get_submodule(module).weight.detach().clone()
    for name in ("b", "c"):
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama), adapter_root / name
        )
        merged = peft_model.merge_and_unload()
        delta = merged.get_submodule(module).weight.detach() - w0
        torch.testing.assert_close(delta, lora_delta(adapter_root / name, module), rtol=1e-4, atol=1e-6)
        assert delta.abs().max() > 1e-3


def test_factories_are_deterministic(tmp_path: Path, tiny_llama: Path) -> None:
    a1 = make_adapter(tmp_path / "a1", tiny_llama, r=4, seed=7)
    a2 = make_adapter(tmp_path / "a2", tiny_llama, r=4, seed=7)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a1 / f).read_bytes() == (a2 / f).read_bytes()
    m = make_tiny_llama(tmp_path / "m", seed=0)
    assert (m / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    assert json.loads((a1 / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama)
