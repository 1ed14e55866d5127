"""The demo assets: each adapter has its skill and only it, one pair survives a merge and one does not,
transformers and PEFT load the files as they are, rebuilds are byte-identical, and the cache is reused."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from demo.assets import (
    BASE_MODEL_NAME,
    CONFLICTING_PAIR,
    MERGEABLE_PAIR,
    VARIANTS,
    DemoAssets,
    asset_hash,
    build_assets,
)
from demo.cache import default_dir, ensure_assets

pytestmark = pytest.mark.slow

# A few steps only: enough to exercise every stage of the build, not to learn anything.
TINY = replace(
    VARIANTS["small"],
    variant="tiny",
    base_steps=6,
    adapter_steps=3,
    base_table_size=6,
    facts_table_size=4,
    unknown_keys=8,
    eval_prompts=4,
)


def test_each_adapter_has_its_skill_and_only_its_own(demo_small: DemoAssets) -> None:
    single = demo_small.measurements()["single"]
    tasks = [t["name"] for t in demo_small.suite()["tasks"]]
    assert all(single["base"][t] <= 0.2 for t in tasks), single["base"]
    for task in demo_small.suite()["tasks"]:
        scores = single[task["adapter"]]
        assert scores[task["name"]] >= 0.9, (task["adapter"], scores)
        assert all(scores[t] <= 0.2 for t in tasks if t != task["name"]), (task["adapter"], scores)


def test_one_pair_survives_the_exact_merge_and_one_conflicts(demo_small: DemoAssets) -> None:
    merged = demo_small.measurements()["merged"]

    def runs(pair: tuple[str, str], space: str) -> list[dict]:
        return [m for m in merged if tuple(m["adapters"]) == pair and m["space"] == space]

    best = max(min(m["scores"].values()) for m in runs(MERGEABLE_PAIR, "delta"))
    assert best >= 0.5, runs(MERGEABLE_PAIR, "delta")
    factors = max(min(m["scores"].values()) for m in runs(MERGEABLE_PAIR, "factors"))
    assert best >= factors
    conflict = max(min(m["scores"].values()) for m in runs(CONFLICTING_PAIR, "delta"))
    assert conflict < 0.5, runs(CONFLICTING_PAIR, "delta")


def test_files_are_a_hf_model_and_peft_adapters(demo_small: DemoAssets) -> None:
    base = demo_small.base_dir
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (base / name).is_file(), name
    inventory = demo_small.inventory()
    assert inventory["base_model"]["name"] == BASE_MODEL_NAME
    assert 400_000 < inventory["base_model"]["parameters"] < 700_000
    assert {a["name"] for a in inventory["adapters"]} == set(demo_small.adapters)
    for entry in inventory["adapters"]:
        cfg = json.loads((demo_small.root / entry["path"] / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == BASE_MODEL_NAME == entry["base_model"]
        assert (cfg["r"], cfg["lora_alpha"]) == (entry["rank"], entry["alpha"]) == (8, 16)
        assert len(cfg["target_modules"]) == 7 and cfg["bias"] == "none" and not cfg["use_dora"]
    suite = demo_small.suite()
    assert [t["adapter"] for t in suite["tasks"]] == [a["name"] for a in inventory["adapters"]]
    assert all(len(t["prompts"]) >= 20 and t["scorer"] == "exact" for t in suite["tasks"])


def test_transformers_and_peft_reproduce_each_skill(demo_small: DemoAssets, one_torch_thread: None) -> None:
    """The oracle here is PEFT + transformers loading the files from disk, not this project's code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_small.base_dir)
    assert tok.eos_token == "\n"
    assert tok.convert_ids_to_tokens(tok("rev: ab =")["input_ids"]) == list("rev: ab =")
    base = AutoModelForCausalLM.from_pretrained(demo_small.base_dir, dtype=torch.float32)
    tasks = demo_small.suite()["tasks"]
    model = None
    for task in tasks:
        name, path = task["adapter"], str(demo_small.adapters[task["adapter"]])
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    assert model is not None
    model.eval()
    for task in tasks:
        model.set_adapter(task["adapter"])
        cases = task["prompts"][:16]
        batch = tok([c["prompt"] for c in cases], return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        hits = sum(t == c["expected"] for t, c in zip(texts, cases, strict=True))
        assert hits >= 0.9 * len(cases), (task["name"], texts)


def test_rebuild_is_byte_identical_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAMERGE_DEMO_CACHE", str(tmp_path / "cache"))
    logged: list[str] = []
    killed = default_dir(TINY).parent / f".{default_dir(TINY).name}.killed"  # a build that never finished
    (killed / "base").mkdir(parents=True)
    first = ensure_assets(TINY, log=logged.append)
    assert first.root == default_dir(TINY) and first.root.name.startswith("tiny-")
    assert logged, "the first call builds"
    second = build_assets(tmp_path / "again", TINY, log=lambda _m: None)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert Path("adapters/facts/adapter_model.safetensors") in files
    assert files == sorted(p.relative_to(second.root) for p in second.root.rglob("*") if p.is_file())
    for rel in files:
        assert (first.root / rel).read_bytes() == (second.root / rel).read_bytes(), rel

    logged.clear()
    again = ensure_assets(TINY, log=logged.append)
    assert again.root == first.root and not logged, "an up-to-date build is reused"

    other = replace(TINY, seed=TINY.seed + 1)
    assert asset_hash(other) != asset_hash(TINY) and default_dir(other) != default_dir(TINY)
    leftovers = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith(".")]
    assert not leftovers, "no temporary build directory is left behind (nor a killed build's)"


def test_command_line_reuses_a_finished_build(demo_small: DemoAssets) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "demo.assets", "--variant", "small", "--out", str(demo_small.root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.strip() == str(demo_small.root)
    assert "building" not in out.stderr
