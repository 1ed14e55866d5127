"""Our delta-space merges against PEFT's add_weighted_adapter, an implementation nobody here wrote.

- ``cat`` concatenates ranks: exactly Σ w_i s_i B_i A_i. Our delta linear must equal it (float32
  round-off) for adapters of different ranks, alphas and rsLoRA.
- ``ties_svd``/``magnitude_prune_svd`` at an SVD rank ≥ min(d_out, d_in) reproduce the strategy
  applied to the dense deltas; ours at the same rank must equal them.
PEFT names the merged adapter after the first input's config (r = lora_alpha = new rank, use_rslora
inherited), so a non-rsLoRA adapter goes first here; our output is also loaded back through PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from merge_service.output import write_peft_dir
from merge_service.pipeline import Merger
from merge_service.sources import SourceResolver
from merge_service.spec import AdapterRef, MergeSpec, SignMethod, Strategy

NAMES = ("a", "b", "c", "e")  # r8 α16, r4 α8, r8 rsLoRA, r8 α32
WEIGHTS = (0.7, 1.3, -0.6, 0.4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def peft_model(tiny_llama: Path, adapter_root: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, adapter_root / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(adapter_root / name, adapter_name=name)
    return model


def peft_deltas(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[name] = module.get_delta_weight(adapter).detach().float()
    return out


def ours(adapter_root: Path, tmp_path: Path, tiny_llama: Path, **kw) -> dict[str, torch.Tensor]:
    """Merge with our pipeline, write a PEFT dir, load it with PEFT and read its deltas back."""
    merger = Merger(SourceResolver(adapter_root), device="cpu")
    spec = MergeSpec(
        adapters=tuple(AdapterRef(n, weight=w) for n, w in zip(NAMES, WEIGHTS, strict=True)), **kw
    )
    built = merger.build(merger.plan(spec))
    write_peft_dir(built, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["r"] == built.rank
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "merged")
    return peft_deltas(model, "default")


def assert_same(
    theirs: dict[str, torch.Tensor], mine: dict[str, torch.Tensor], rtol: float, atol: float
) -> None:
    assert sorted(theirs) == sorted(mine) and len(mine) == 14
    for name in theirs:
        assert theirs[name].abs().max() > 1e-3
        torch.testing.assert_close(mine[name], theirs[name], rtol=rtol, atol=atol, msg=name)


def test_delta_linear_equals_peft_cat(
    peft_model: PeftModel, adapter_root: Path, tmp_path: Path, tiny_llama: Path
) -> None:
    peft_model.add_weighted_adapter(list(NAMES), list(WEIGHTS), "cat", combination_type="cat")
    theirs = peft_deltas(peft_model, "cat")
    assert_same(theirs, ours(adapter_root, tmp_path, tiny_llama), rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize(
    ("peft_type", "strategy", "method"),
    [
        ("ties_svd", Strategy.TIES, "total"),
        ("ties_svd", Strategy.TIES, "frequency"),
        ("magnitude_prune_svd", Strategy.MAGNITUDE_PRUNE, "total"),
    ],
)
def test_full_rank_strategies_equal_peft_svd_variants(
    peft_model: PeftModel,
    adapter_root: Path,
    tmp_path: Path,
    tiny_llama: Path,
    peft_type: str,
    strategy: Strategy,
    method: str,
) -> None:
    full = 128  # ≥ min(d_out, d_in) of every module of the tiny model
    name = f"{peft_type}-{method}"
    peft_model.add_weighted_adapter(
        list(NAMES),
        list(WEIGHTS),
        name,
        combination_type=peft_type,
        svd_rank=full,
        density=0.4,
        majority_sign_method=method,
        svd_full_matrices=False,  # PEFT cannot reshape full U/Vh when svd_rank > min(d_out, d_in)
    )
    theirs = peft_deltas(peft_model, name)
    mine = ours(
        adapter_root,
        tmp_path,
        tiny_llama,
        strategy=strategy,
        density=0.4,
        sign_method=SignMethod(method),
        target_rank=full,
    )
    assert_same(theirs, mine, rtol=1e-4, atol=1e-5)
