"""Merger.plan/build on tiny adapters built with PEFT: exactness, determinism, errors, known defects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from loramerge.errors import FailedPrecondition, InvalidArgument, NotFound
from merge_service import pipeline
from merge_service.identity import derived_seed
from merge_service.merged import MergedAdapter
from merge_service.module_merge import delta_dense
from merge_service.output import tensor_names, write_peft_dir
from merge_service.pipeline import Merger, load_record
from merge_service.sources import SourceResolver
from merge_service.spec import AdapterRef, Dtype, MergeSpec, SignMethod, SourceKind, Space, Strategy
from tests.factories import lora_delta, make_adapter

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def merger(adapter_root: Path) -> Merger:
    return Merger(SourceResolver(adapter_root), device="cpu")


def spec(*pairs: tuple[str, float], **kw) -> MergeSpec:
    return MergeSpec(adapters=tuple(AdapterRef(i, weight=w) for i, w in pairs), **kw)


def merged_delta(built: MergedAdapter, module: str) -> torch.Tensor:
    t = load_bytes(built.data)
    a, b = tensor_names(module)
    cfg = json.loads(built.config_json)
    assert cfg["lora_alpha"] == cfg["r"] and cfg["use_rslora"] is False  # scale 1
    return t[b].float() @ t[a].float()


def test_linear_delta_is_exact_with_each_adapters_own_scale(merger: Merger, adapter_root: Path) -> None:
    """a: r8 α16, b: r4 α8, c: r8 rsLoRA, e: r8 α32 — each keeps its own scale (no 'first alpha wins')."""
    built = merger.build(merger.plan(spec(("a", 0.5), ("b", 1.5), ("c", -1.0), ("e", 0.25))))
    assert built.rank == 28
    for module in (Q, DOWN):
        want = sum(
            w * lora_delta(adapter_root / n, module)
            for n, w in (("a", 0.5), ("b", 1.5), ("c", -1.0), ("e", 0.25))
        )
        torch.testing.assert_close(merged_delta(built, module), want, rtol=1e-5, atol=1e-6)
    assert built.max_relative_error == 0.0


@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("w", [0.5, -2.0])
def test_single_adapter_can_be_reweighted(
    merger: Merger, adapter_root: Path, strategy: str, w: float
) -> None:
    built = merger.build(merger.plan(spec(("c", w), strategy=Strategy(strategy), density=1.0)))
    torch.testing.assert_close(
        merged_delta(built, Q), w * lora_delta(adapter_root / "c", Q), rtol=1e-4, atol=1e-6
    )


def test_build_is_deterministic_and_order_free(adapter_root: Path) -> None:
    for strategy in (Strategy.LINEAR, Strategy.DARE_TIES, Strategy.TIES):
        pairs = [("a", 0.7), ("b", 0.2), ("e", 1.1)]
        kw = {"strategy": strategy, "density": 0.4, "target_rank": 10}
        m1, m2 = Merger(SourceResolver(adapter_root), "cpu"), Merger(SourceResolver(adapter_root), "cpu")
        p1, p2 = m1.plan(spec(*pairs, **kw)), m2.plan(spec(*reversed(pairs), **kw))
        assert p1.merge_key == p2.merge_key
        b1, b2 = m1.build(p1), m2.build(p2)
        assert b1.data == b2.data and b1.sha256 == b2.sha256
        assert m1.build(p1).data == b1.data


def test_dare_seed_defaults_to_a_derived_one_and_seeds_matter(merger: Merger) -> None:
    s = spec(("a", 1.0), ("e", 1.0), strategy=Strategy.DARE_LINEAR, density=0.5)
    plan = merger.plan(s)
    assert plan.spec.seed is not None
    digests = [src.digest for src in plan.sources]
    assert plan.spec.seed == derived_seed(s.normalized(), digests, plan.rank)
    explicit = merger.plan(
        spec(("a", 1.0), ("e", 1.0), strategy=Strategy.DARE_LINEAR, density=0.5, seed=plan.spec.seed)
    )
    assert explicit.merge_key == plan.merge_key
    other = merger.plan(spec(("a", 1.0), ("e", 1.0), strategy=Strategy.DARE_LINEAR, density=0.5, seed=7))
    assert other.merge_key != plan.merge_key
    assert merger.build(other).data != merger.build(plan).data


def test_dare_is_rescaled_in_the_pipeline(merger: Merger, adapter_root: Path) -> None:
    """Mean over seeds of dare_linear approaches linear; without the 1/density it would be 0.3× of it."""
    n = 4
    total = None
    for seed in range(n):
        built = merger.build(
            merger.plan(
                spec(("a", 1.0), strategy=Strategy.DARE_LINEAR, density=0.3, seed=seed, target_rank=128)
            )
        )
        d = merged_delta(built, Q)
        total = d if total is None else total + d
    exact = lora_delta(adapter_root / "a", Q)
    ratio = float((total / n * exact).sum() / (exact * exact).sum())
    assert 0.9 < ratio < 1.1, ratio


def test_ties_full_rank_equals_strategy_on_dense_deltas(merger: Merger, adapter_root: Path) -> None:
    from merge_service import strategies
    from merge_service.strategies import MergeParams

    built = merger.build(
        merger.plan(
            spec(
                ("a", 0.6),
                ("b", 1.0),
                ("c", 0.8),
                strategy=Strategy.TIES,
                density=0.3,
                sign_method=SignMethod.FREQUENCY,
                target_rank=256,
            )
        )
    )
    for module in (Q, DOWN):
        dense = [lora_delta(adapter_root / n, module) for n in "abc"]
        want = strategies.ties(dense, [0.6, 1.0, 0.8], MergeParams(0.3, SignMethod.FREQUENCY), [])
        torch.testing.assert_close(merged_delta(built, module), want, rtol=1e-4, atol=1e-6)
    assert built.max_relative_error == 0.0


def test_low_rank_compression_reports_error_and_scales_once(merger: Merger, adapter_root: Path) -> None:
    built = merger.build(merger.plan(spec(("a", 1.0), ("e", 1.0), target_rank=6)))
    assert built.rank == 6
    want = lora_delta(adapter_root / "a", Q) + lora_delta(adapter_root / "e", Q)
    s = torch.linalg.svdvals(want.double())
    optimum = float((s[6:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
    got = merged_delta(built, Q).double()
    assert float((got - want).norm() / want.norm()) == pytest.approx(optimum, rel=1e-3)
    stat = next(m for m in built.modules if m.name == Q)
    assert stat.relative_error == pytest.approx(optimum, rel=1e-3) and stat.rank == 6


def test_max_rank_caps_and_compresses_or_refuses(merger: Merger) -> None:
    plan = merger.plan(spec(("a", 1.0), ("b", 1.0), max_rank=8))
    assert plan.rank == 8
    built = merger.build(plan)
    assert json.loads(built.config_json)["r"] == 8 and built.max_relative_error > 0
    with pytest.raises(FailedPrecondition, match="max_rank 8") as e:
        merger.plan(spec(("a", 1.0), ("b", 1.0), max_rank=8, target_rank=10))
    assert e.value.field == "spec.target_rank"


def test_factors_space_merges_a_and_b_separately(merger: Merger, adapter_root: Path) -> None:
    built = merger.build(merger.plan(spec(("a", 0.5), ("e", 2.0), space=Space.FACTORS)))
    assert built.rank == 8
    from safetensors.torch import load_file

    fa = load_file(adapter_root / "a" / "adapter_model.safetensors")
    fe = load_file(adapter_root / "e" / "adapter_model.safetensors")
    a_key, b_key = tensor_names(Q)
    want_b = 0.5 * (16 / 8) * fa[b_key] + 2.0 * (32 / 8) * fe[b_key]
    want_a = 0.5 * fa[a_key] + 2.0 * fe[a_key]
    t = load_bytes(built.data)
    torch.testing.assert_close(t[b_key], want_b)
    torch.testing.assert_close(t[a_key], want_a)
    assert built.max_relative_error > 0.1  # cross terms: reported, not hidden


def test_factors_space_refuses_unequal_ranks(merger: Merger) -> None:
    with pytest.raises(InvalidArgument, match="space=delta") as e:
        merger.plan(spec(("a", 1.0), ("b", 1.0), space=Space.FACTORS))
    assert e.value.field == "spec.space"


def test_different_base_models_are_refused(merger: Merger) -> None:
    with pytest.raises(FailedPrecondition, match="other/base-model") as e:
        merger.plan(spec(("a", 1.0), ("d", 1.0)))
    assert e.value.field == "spec.adapters"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"strategy": Strategy.TIES}, "spec.density"),
        ({"strategy": Strategy.DARE_TIES, "density": 0.0}, "spec.density"),
        ({"strategy": Strategy.MAGNITUDE_PRUNE, "density": 1.5}, "spec.density"),
        ({"strategy": Strategy.DARE_LINEAR, "density": float("nan")}, "spec.density"),
        ({"strategy": "bogus"}, "spec.merge_strategy"),
        ({"seed": -1}, "spec.seed"),
        ({"target_rank": -3}, "spec.target_rank"),
    ],
)
def test_bad_parameters_name_field_and_value(merger: Merger, kw: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        merger.plan(spec(("a", 1.0), **kw))
    assert e.value.field == field and field in str(e.value)


def test_density_never_silently_defaults(merger: Merger) -> None:
    with pytest.raises(InvalidArgument, match=r"spec\.density is required"):
        merger.plan(spec(("a", 1.0), strategy=Strategy.TIES))


def test_bad_weight_and_missing_adapter(merger: Merger) -> None:
    with pytest.raises(InvalidArgument, match=r"spec.adapters\[1\].weight must be a finite number, got inf"):
        merger.plan(spec(("a", 1.0), ("b", float("inf"))))
    with pytest.raises(NotFound) as e:
        merger.plan(MergeSpec(adapters=(AdapterRef("a"), AdapterRef("nope", source=SourceKind.LOCAL))))
    assert e.value.field == "spec.adapters[1]"
    with pytest.raises(InvalidArgument, match="at least one"):
        merger.plan(MergeSpec(adapters=()))


def test_adapters_resolve_concurrently_and_the_first_failing_one_in_spec_order_is_reported(
    merger: Merger,
) -> None:
    import threading
    import time

    class Slow:
        """Resolves adapter 0 slowly and fails it; adapter 2 fails at once; records overlap."""

        def __init__(self, inner: SourceResolver) -> None:
            self.inner, self.active, self.most = inner, 0, 0
            self.lock = threading.Lock()

        def resolve(self, ref: AdapterRef, field: str = "adapter"):  # type: ignore[no-untyped-def]
            with self.lock:
                self.active += 1
                self.most = max(self.most, self.active)
            try:
                if field == "spec.adapters[0]":
                    time.sleep(0.2)
                    raise NotFound("adapter 0 is gone", field=field)
                if field == "spec.adapters[2]":
                    raise InvalidArgument("adapter 2 is bad", field=field)
                return self.inner.resolve(ref, field=field)
            finally:
                with self.lock:
                    self.active -= 1

    slow = Slow(merger.resolver)
    with pytest.raises(NotFound, match="adapter 0 is gone"):
        Merger(slow, device="cpu").plan(spec(("a", 1.0), ("b", 1.0), ("a", 0.5)))  # type: ignore[arg-type]
    assert slow.most >= 2


def test_modules_in_some_adapters_only_are_unioned(tmp_path: Path, tiny_llama: Path) -> None:
    make_adapter(tmp_path / "q", tiny_llama, r=4, target_modules=("q_proj",), seed=1)
    make_adapter(
        tmp_path / "v",
        tiny_llama,
        r=8,
        target_modules=("v_proj", "q_proj"),
        seed=2,
        rank_pattern={"q_proj": 2},
    )
    m = Merger(SourceResolver(tmp_path), "cpu")
    for strategy in (Strategy.LINEAR, Strategy.TIES):
        built = m.build(m.plan(spec(("q", 1.0), ("v", 0.5), strategy=strategy, density=1.0)))
        assert json.loads(built.config_json)["target_modules"] == ["q_proj", "v_proj"]
        v = "model.layers.0.self_attn.v_proj"
        torch.testing.assert_close(
            merged_delta(built, v), 0.5 * lora_delta(tmp_path / "v", v), rtol=1e-4, atol=1e-6
        )
        if strategy == Strategy.LINEAR:
            assert built.rank == 8  # q: 4 + 2, v: 8 → padded to the largest
            want_q = lora_delta(tmp_path / "q", Q) + 0.5 * lora_delta(tmp_path / "v", Q)
            torch.testing.assert_close(merged_delta(built, Q), want_q, rtol=1e-4, atol=1e-6)
            assert {s.name: s.rank for s in built.modules}[Q] == 6


def test_output_dtype_config_and_record(merger: Merger, tmp_path: Path) -> None:
    plan = merger.plan(spec(("a", 1.0), ("b", 0.5), dtype=Dtype.BFLOAT16))
    progress: list[tuple[str, int, int]] = []
    built = merger.build(plan, progress=lambda *p: progress.append(p))
    assert ("merge", len(plan.modules), len(plan.modules)) in progress
    t = load_bytes(built.data)
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    assert abs(len(built.data) - plan.estimated_bytes) < 0.05 * len(built.data)
    cfg = json.loads(built.config_json)
    assert cfg["r"] == cfg["lora_alpha"] == 12 and cfg["use_rslora"] is False and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == plan.base_model
    assert "loramerge" not in cfg  # PEFT warns about keys it does not know
    meta = json.loads(built.data[8 : 8 + int.from_bytes(built.data[:8], "little")])["__metadata__"]
    assert meta["loramerge.merge_key"] == plan.merge_key
    assert json.loads(meta["loramerge.canonical_spec"])["rank"] == 12
    record = json.loads(built.record_json)
    assert record["merge_key"] == plan.merge_key
    assert [a["id"] for a in record["request"]["adapters"]] == ["a", "b"]
    out = tmp_path / "out"
    write_peft_dir(built, out)
    assert (out / "adapter_model.safetensors").read_bytes() == built.data
    assert load_record(out) == record
    with pytest.raises(FailedPrecondition, match="not empty"):
        write_peft_dir(built, out)
    write_peft_dir(built, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


def test_delta_dense_helper() -> None:
    from merge_service.adapter import LoraModule

    p = LoraModule(A=torch.ones(2, 3), B=torch.ones(4, 2), scale=0.5)
    assert torch.equal(delta_dense(p), torch.full((4, 3), 1.0))


def test_an_adapter_rewritten_between_plan_and_build_is_aborted(tmp_path: Path, tiny_llama: Path) -> None:
    """Same shapes, other values: the build hashes what it reads, sees the planned digest is gone and
    fails ABORTED (retryable); a new plan gives a new key, and its build reads the new bytes."""
    import shutil

    from loramerge.errors import Aborted

    root = tmp_path / "adapters"
    make_adapter(root / "a", tiny_llama, r=8, alpha=16, seed=1)
    make_adapter(root / "b", tiny_llama, r=4, alpha=8, seed=2)
    merger = Merger(SourceResolver(root), device="cpu")
    plan = merger.plan(spec(("a", 0.5), ("b", 0.5)))
    shutil.rmtree(root / "a")
    make_adapter(root / "a", tiny_llama, r=8, alpha=16, seed=7)  # same shapes, different weights
    with pytest.raises(Aborted, match="changed between plan and build") as info:
        merger.build(plan)
    assert info.value.field == "spec.adapters[0]"
    replanned = merger.plan(spec(("a", 0.5), ("b", 0.5)))
    assert replanned.merge_key != plan.merge_key
    assert merger.build(replanned).data


@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_ties", "magnitude_prune"])
def test_16bit_inputs_kept_until_merged_give_the_bytes_of_a_float32_load(
    adapter_root: Path, tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build keeps bfloat16 inputs as stored and widens each module at its turn: the bytes are
    those of a build that decodes every input to float32 up front (widening is exact)."""
    for name in ("a", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_bytes(
            (adapter_root / name / "adapter_config.json").read_bytes()
        )
        tensors = load_file(adapter_root / name / "adapter_model.safetensors")
        bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
        save_file(bf16, tmp_path / name / "adapter_model.safetensors")
    merger = Merger(SourceResolver(tmp_path), device="cpu")
    kw = {"density": 0.5} if strategy != "linear" else {}
    plan = merger.plan(spec(("a", 0.7), ("c", 0.6), strategy=Strategy(strategy), seed=3, **kw))
    kept = merger.build(plan)
    seen, load = [], pipeline.load_adapter

    def eager(*args, keep_16bit: bool = False, **kwargs):  # the loader as it was: float32 at once
        seen.append(keep_16bit)
        return load(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_adapter", eager)
    assert merger.build(plan).data == kept.data
    assert seen == [True, True]
