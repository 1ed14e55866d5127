"""Loading PEFT LoRA adapters into memory, checked against PEFT itself (the oracle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from loramerge.errors import InvalidArgument, NotFound
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service.adapter import AdapterConfig, all_finite, load_adapter, parse_config, read_config
from merge_service.sources.base import ResolvedSource
from merge_service.spec import SourceKind
from tests.factories import lora_delta, make_adapter


def _src(path: Path, adapter_id: str = "x", digest: str = "sha256:test") -> ResolvedSource:
    return ResolvedSource(id=adapter_id, kind=SourceKind.LOCAL, revision="", digest=digest, path=path)


@pytest.fixture(scope="module")
def patterned(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """rsLoRA with per-module ranks and alphas, given as suffixes, full names and regexes."""
    return make_adapter(
        tmp_path_factory.mktemp("patterned") / "p",
        tiny_llama,
        r=8,
        alpha=16,
        use_rslora=True,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2, r"layers\.0\.mlp\.up_proj": 6},
        alpha_pattern={"v_proj": 40, "down_proj": 3},
        seed=7,
    )


def _peft_model(tiny_llama: Path, adapter_dir: Path) -> torch.nn.Module:
    from transformers import AutoConfig, LlamaForCausalLM

    with torch.device("meta"):
        base = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_llama))
    base = base.to_empty(device="cpu")
    return PeftModel.from_pretrained(base, adapter_dir)


@pytest.mark.parametrize("name", ["a", "c"])
def test_factors_and_scales_match_peft(tiny_llama: Path, adapter_root: Path, name: str) -> None:
    _check_against_peft(tiny_llama, adapter_root / name)


def test_rank_and_alpha_patterns_match_peft(tiny_llama: Path, patterned: Path) -> None:
    adapter = _check_against_peft(tiny_llama, patterned)
    ranks = {m: mod.A.shape[0] for m, mod in adapter.modules.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4
    assert ranks["model.layers.1.mlp.down_proj"] == 2
    assert ranks["model.layers.0.mlp.up_proj"] == 6
    assert ranks["model.layers.1.mlp.up_proj"] == 8


def _check_against_peft(tiny_llama: Path, adapter_dir: Path):
    adapter = load_adapter(_src(adapter_dir, digest="sha256:abc"))
    peft_model = _peft_model(tiny_llama, adapter_dir)
    expected = {}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            expected[name.removeprefix("base_model.model.")] = layer
    assert set(adapter.modules) == set(expected)
    assert len(expected) == 2 * 7
    for module, layer in expected.items():
        ours = adapter.modules[module]
        assert ours.A.dtype == torch.float32 and ours.B.dtype == torch.float32
        torch.testing.assert_close(ours.A, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(ours.B, layer.lora_B["default"].weight, rtol=0, atol=0)
        assert ours.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert adapter.config.scale_for(module) == pytest.approx(layer.scaling["default"], rel=1e-12)
        # The factory's independent oracle for ΔW agrees too.
        torch.testing.assert_close(ours.scale * ours.B @ ours.A, lora_delta(adapter_dir, module))
    assert adapter.digest == "sha256:abc"
    assert adapter.nbytes == sum(m.A.numel() * 4 + m.B.numel() * 4 for m in adapter.modules.values())
    return adapter


@pytest.mark.parametrize(
    "module",
    [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.10.mlp.up_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.k_proj",
        "xq_proj",
    ],
)
def test_pattern_lookup_is_pefts_get_pattern_key(module: str) -> None:
    rank_pattern = {"q_proj": 4, "model.layers.1.mlp.down_proj": 2, r"layers\.0\.mlp\.up_proj": 6}
    alpha_pattern = {"v_proj": 40.0, "down_proj": 3.0}
    cfg = parse_config(
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": rank_pattern,
         "alpha_pattern": alpha_pattern},
        "x",
    )  # fmt: skip
    assert cfg.rank_for(module) == rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), 8)
    assert cfg.alpha_for(module) == alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), 16)


def test_read_config_reads_no_tensors(adapter_root: Path, tmp_path: Path) -> None:
    d = tmp_path / "only-config"
    d.mkdir()
    shutil.copy(adapter_root / "b" / CONFIG_FILE, d / CONFIG_FILE)
    cfg = read_config(d, "b")
    assert isinstance(cfg, AdapterConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (4, 8.0, False)
    assert set(cfg.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert cfg.base_model and cfg.raw["peft_type"] == "LORA"
    assert read_config(d / CONFIG_FILE, "b") == cfg
    with pytest.raises(NotFound, match=r"'nope'.*adapter_config\.json"):
        read_config(tmp_path / "nope", "nope")


def test_rslora_scale_uses_sqrt_of_rank() -> None:
    cfg = parse_config({"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj"]}, "x")
    assert cfg.scale_for("q_proj") == pytest.approx(8 / 4)
    cfg = parse_config({"r": 16, "lora_alpha": 8, "target_modules": ["q_proj"]}, "x")
    assert cfg.scale_for("q_proj") == pytest.approx(8 / 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_weights_load_as_float32(
    adapter_root: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    d = tmp_path / "half"
    shutil.copytree(adapter_root / "a", d)
    tensors = {k: v.to(dtype) for k, v in load_file(d / WEIGHTS_FILE).items()}
    save_file(tensors, d / WEIGHTS_FILE, metadata={"format": "pt"})
    adapter = load_adapter(_src(d))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    got = adapter.modules["model.layers.0.self_attn.q_proj"].A
    assert got.dtype == torch.float32
    assert torch.equal(got, tensors[key].to(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_keep_16bit_keeps_half_factors_as_stored_and_widens_them_exactly(
    adapter_root: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    """A build keeps 16-bit inputs as stored until their module's turn (half the memory); widened,
    they are the very factors the float32 load gives. Wider dtypes are decoded to float32 at once."""
    d = tmp_path / "kept"
    shutil.copytree(adapter_root / "a", d)
    save_file(
        {k: v.to(dtype) for k, v in load_file(d / WEIGHTS_FILE).items()},
        d / WEIGHTS_FILE,
        metadata={"format": "pt"},
    )
    kept, wide = load_adapter(_src(d), keep_16bit=True), load_adapter(_src(d))
    assert kept.modules.keys() == wide.modules.keys()
    half = dtype in (torch.float16, torch.bfloat16)
    for name, module in kept.modules.items():
        assert module.A.dtype == module.B.dtype == (dtype if half else torch.float32)
        widened = module.float32()
        assert (widened is module) == (not half)
        assert widened.A.dtype == widened.B.dtype == torch.float32
        assert torch.equal(widened.A, wide.modules[name].A) and torch.equal(widened.B, wide.modules[name].B)
        assert widened.scale == wide.modules[name].scale
    assert kept.nbytes == (wide.nbytes // 2 if half else wide.nbytes)


def test_regex_target_modules_and_unprefixed_keys(adapter_root: Path, tmp_path: Path) -> None:
    """PEFT's string form of target_modules is a full-match regex; keys without the PEFT prefix load too."""
    d = tmp_path / "regex"
    shutil.copytree(adapter_root / "b", d)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg["target_modules"] = r".*\.(q_proj|v_proj)"
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    tensors = {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(d / WEIGHTS_FILE).items()
        if ".q_proj." in k or ".v_proj." in k
    }
    save_file(tensors, d / WEIGHTS_FILE)
    adapter = load_adapter(_src(d))
    assert sorted(adapter.modules) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    # A module the regex does not target is a config that lies about its content.
    for which in "AB":
        q = tensors[f"model.layers.0.self_attn.q_proj.lora_{which}.weight"]
        tensors[f"model.layers.0.self_attn.k_proj.lora_{which}.weight"] = q.clone()
    save_file(tensors, d / WEIGHTS_FILE)
    with pytest.raises(InvalidArgument, match=r"k_proj.*target_modules"):
        load_adapter(_src(d))


def test_errors_carry_the_callers_field(adapter_root: Path, tmp_path: Path) -> None:
    d = tmp_path / "nan"
    shutil.copytree(adapter_root / "b", d)
    tensors = load_file(d / WEIGHTS_FILE)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, d / WEIGHTS_FILE)
    with pytest.raises(InvalidArgument) as info:
        load_adapter(_src(d, "team/b"), field="spec.adapters[1].id")
    assert info.value.field == "spec.adapters[1].id"
    assert "'team/b'" in info.value.message and "NaN" in info.value.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (16, 1031)])
def test_all_finite_agrees_with_isfinite(value: float, shape: tuple[int, ...]) -> None:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert all_finite(t)
    for pos in {0, t.numel() // 2, t.numel() - 1}:
        bad = t.clone()
        bad.view(-1)[pos] = value
        assert not all_finite(bad) and not bool(torch.isfinite(bad).all())


def test_read_tensors_matches_the_official_reader_and_hashlib(tmp_path: Path) -> None:
    import hashlib

    from merge_service.adapter import read_safetensors_header, read_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "m.lora_A.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "m.lora_B.weight": torch.randn(6, 3, generator=g),
        "n.lora_A.weight": torch.randn(2, 4, generator=g).double(),
        "z.empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    path = tmp_path / WEIGHTS_FILE
    save_file(tensors, str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        infos, start = read_safetensors_header(f, size, "a")
        got, digest = read_tensors(f, infos, start, size)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert got is not None and got.keys() == load_file(str(path)).keys()
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    # The file cut short, or grown, after its header was checked: not the file the header described.
    for changed in (path.read_bytes()[:-4], path.read_bytes() + b"\0"):
        path.write_bytes(changed)
        with open(path, "rb") as f:
            assert read_tensors(f, infos, start, size) == (None, "")
