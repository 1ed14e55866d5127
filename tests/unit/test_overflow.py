"""Merges whose result the output dtype cannot hold are refused, naming spec.dtype or the heaviest weight.

Finite weights can still overflow: float16 ends at 65504, float32 at 3.4e38, and in factors space the
weights scale both factors, so finite factors can multiply to an update ΔW = B·A beyond float32. Such
a merge used to come back OK holding inf (or NaN after vLLM multiplied it out).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes

from loramerge.errors import InvalidArgument
from merge_service.output import tensor_names
from merge_service.pipeline import Merger, product_peak
from merge_service.sources import SourceResolver
from merge_service.spec import AdapterRef, Dtype, MergeSpec, Space, Strategy


@pytest.fixture(scope="module")
def merger(adapter_root: Path) -> Merger:
    return Merger(SourceResolver(adapter_root), device="cpu")


def spec(*pairs: tuple[str, float], **kw) -> MergeSpec:
    return MergeSpec(adapters=tuple(AdapterRef(i, weight=w) for i, w in pairs), **kw)


def refusal(merger: Merger, s: MergeSpec) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        merger.build(merger.plan(s))
    return info.value


def test_float32_overflow_names_the_heaviest_weight(merger: Merger) -> None:
    err = refusal(merger, spec(("b", 0.5), ("a", 3e38)))
    assert err.field == "spec.adapters[1].weight"
    assert err.message.startswith("spec.adapters[1].weight = 3e+38: module ")
    assert "overflows float32" in err.message and "lower the adapters' weights" in err.message


def test_float16_overflow_names_the_dtype_with_a_hint(merger: Merger) -> None:
    err = refusal(merger, spec(("b", 1e6), dtype=Dtype.FLOAT16))
    assert err.field == "spec.dtype"
    assert err.message.startswith("spec.dtype float16: module ")
    assert "65504" in err.message and "spec.adapters[0].weight = 1e+06" in err.message
    assert "or use float32" in err.message
    # The same merge in float32 is fine: the dtype was at fault.
    built = merger.build(merger.plan(spec(("b", 1e6), dtype=Dtype.FLOAT32)))
    assert all(torch.isfinite(t).all() for t in load_bytes(built.data).values())


@pytest.mark.parametrize("strategy", ["ties", "dare_linear", "magnitude_prune"])
def test_dense_strategies_refuse_an_update_that_overflows_before_factorizing(
    merger: Merger, strategy: str
) -> None:
    """The dense merge overflows float32, so it has no SVD: a refusal, not an internal error."""
    err = refusal(merger, spec(("a", 3e38), ("e", 1.0), strategy=Strategy(strategy), density=0.5))
    assert err.field == "spec.adapters[0].weight"


def test_factors_space_refuses_finite_factors_whose_product_overflows(merger: Merger) -> None:
    """Weight 1e20 scales both factors: each is finite, B·A is about 1e39."""
    err = refusal(merger, spec(("a", 1e20), space=Space.FACTORS))
    assert err.field == "spec.adapters[0].weight"
    assert "ΔW = B·A" in err.message and "beyond float32" in err.message


def test_large_but_representable_merges_still_build(merger: Merger, adapter_root: Path) -> None:
    built = merger.build(merger.plan(spec(("b", 50.0), dtype=Dtype.FLOAT16)))
    tensors = load_bytes(built.data)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    a, b = tensor_names("model.layers.0.self_attn.q_proj")
    assert float((tensors[b].float() @ tensors[a].float()).abs().max()) > 1.0


def test_product_peak_is_exact_when_the_cheap_bound_is_exceeded() -> None:
    """Rows of B orthogonal to the columns of A: the Cauchy-Schwarz bound is huge, the product is 0."""
    x = 1e30
    B = torch.tensor([[x, 0.0], [0.0, 0.0]])
    A = torch.tensor([[0.0, 0.0], [x, x]])
    limit = torch.finfo(torch.float32).max
    assert product_peak(B, A, limit) == 0.0
    assert math.isclose(
        product_peak(torch.tensor([[x, 0.0]]), torch.tensor([[x], [0.0]]), limit), 1e60, rel_tol=1e-6
    )
    small = product_peak(torch.ones(3, 2), torch.ones(2, 4), limit)  # the bound, within the limit
    assert 2.0 <= small <= limit
