"""Merge strategies: PEFT's merge_utils as the oracle for the deterministic ones, properties for DARE."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from merge_service import strategies as S
from merge_service.spec import SignMethod


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: intra-op threads only add contention on a shared machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _tensors(n: int, shape=(24, 40), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_registry_declares_parameters() -> None:
    assert set(S.REGISTRY) == {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    assert S.get("linear").params == frozenset() and S.get("linear").linear
    assert S.get("ties").params == {"density", "sign_method"}
    assert S.get("dare_ties").params == {"density", "sign_method", "seed"}
    assert S.get("dare_linear").random and not S.get("magnitude_prune").random
    assert all(d.doc for d in S.REGISTRY.values())


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_matches_peft(density: float, method: str) -> None:
    ts, w = _tensors(3, seed=1), [0.7, -0.4, 1.3]
    params = S.MergeParams(density=density, sign_method=SignMethod(method))
    ours = S.ties(ts, w, params, [])
    theirs = merge_utils.ties(ts, torch.tensor(w), density, method)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_magnitude_prune_and_linear_match_peft(density: float) -> None:
    ts, w = _tensors(4, seed=2), [0.25, 0.5, 1.0, -2.0]
    ours = S.magnitude_prune(ts, w, S.MergeParams(density=density), [])
    torch.testing.assert_close(ours, merge_utils.magnitude_prune(ts, torch.tensor(w), density))
    torch.testing.assert_close(
        S.linear(ts, w, S.MergeParams(), []), merge_utils.task_arithmetic(ts, torch.tensor(w))
    )


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 300), density=st.floats(0.001, 1.0), seed=st.integers(0, 2**32))
def test_magnitude_prune_keeps_exactly_floor_density_n(numel: int, density: float, seed: int) -> None:
    t = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    t[: numel // 3] = t[0]  # many ties at one magnitude
    p = S.magnitude_prune_tensor(t, density)
    k = math.floor(density * numel)
    assert int((p != 0).sum()) == k
    kept = t.abs()[p != 0]
    dropped = t.abs()[p == 0]
    if k and len(dropped):
        assert kept.min() >= dropped.max()
    assert torch.equal(p[p != 0], t[p != 0])


def test_majority_sign_ties_go_positive() -> None:
    pruned = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, -1.0]])
    assert majority(pruned, "total") == [1.0, -1.0, 1.0, 1.0]
    assert majority(pruned, "frequency") == [1.0, 1.0, 1.0, -1.0]


def majority(p: torch.Tensor, method: str) -> list[float]:
    return S.majority_sign(p, SignMethod(method)).tolist()


def test_disjoint_merge_ignores_zeros_and_disagreeing() -> None:
    pruned = torch.tensor([[2.0, 0.0], [4.0, -1.0], [-3.0, 0.0]])
    sign = torch.tensor([1.0, 1.0])
    out = S.disjoint_merge(pruned, torch.tensor([1.0, 0.5, 1.0]), sign)
    # entry 0: (2 + 0.5·4) / 2 agreeing; entry 1: nobody agrees -> 0 / max(1, 0)
    assert out.tolist() == [2.0, 0.0]


@settings(max_examples=25, deadline=None)
@given(perm_seed=st.integers(0, 1000), name=st.sampled_from(["linear", "ties", "magnitude_prune"]))
def test_permutation_changes_nothing(perm_seed: int, name: str) -> None:
    ts, w = _tensors(4, seed=3), [0.5, 1.0, -0.7, 0.2]
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    params = S.MergeParams(density=0.4, sign_method=SignMethod.FREQUENCY)
    a = S.get(name).fn(ts, w, params, [])
    b = S.get(name).fn([ts[i] for i in perm], [w[i] for i in perm], params, [])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(w=st.floats(-4, 4).filter(lambda x: abs(x) > 1e-3), name=st.sampled_from(sorted(S.REGISTRY)))
def test_one_tensor_at_density_one_is_weighted(w: float, name: str) -> None:
    """A single task vector at weight w gives w·T (no strategy may lose the weight)."""
    (t,) = _tensors(1, seed=4)
    out = S.get(name).fn([t], [w], S.MergeParams(density=1.0, seed=5), [11])
    torch.testing.assert_close(out, w * t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_density_one_equals_its_deterministic_twin(name: str) -> None:
    ts, w = _tensors(3, seed=5), [0.3, 0.9, -0.5]
    params = S.MergeParams(density=1.0, sign_method=SignMethod.TOTAL, seed=9)
    twin = "linear" if name == "dare_linear" else "ties"
    torch.testing.assert_close(S.get(name).fn(ts, w, params, [1, 2, 3]), S.get(twin).fn(ts, w, params, []))


def test_dare_is_rescaled_survivors_divided_by_density() -> None:
    (t,) = _tensors(1, shape=(200, 200), seed=6)
    p = S.dare_prune_tensor(t, 0.25, seed=123)
    kept = p != 0
    torch.testing.assert_close(p[kept], t[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.01


def test_dare_mean_over_seeds_approaches_linear() -> None:
    ts, w = _tensors(2, shape=(16, 16), seed=7), [0.6, 1.1]
    params = S.MergeParams(density=0.3)
    n = 600
    mean = sum(S.dare_linear(ts, w, params, [2 * s, 2 * s + 1]) for s in range(n)) / n
    exact = S.linear(ts, w, params, [])
    # std of one draw per entry is about |w t|·sqrt((1-d)/d) ≈ 1.5·|wt|; the mean of 600 shrinks it by ~25
    err = (mean - exact).norm() / exact.norm()
    assert err < 0.12, err
    single = S.dare_linear(ts, w, params, [0, 1])
    assert (single - exact).norm() / exact.norm() > 0.5  # one draw is far off: the test can fail


def test_dare_same_seed_same_bytes_other_seed_differs() -> None:
    ts, w = _tensors(2, seed=8), [1.0, 1.0]
    params = S.MergeParams(density=0.5, sign_method=SignMethod.TOTAL)
    a = S.dare_ties(ts, w, params, [1, 2])
    b = S.dare_ties(ts, w, params, [1, 2])
    c = S.dare_ties(ts, w, params, [1, 3])
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)


def test_tensor_seed_depends_on_every_label() -> None:
    base = S.tensor_seed(1, "m", "d#0", "delta")
    assert base == S.tensor_seed(1, "m", "d#0", "delta")
    others = {
        S.tensor_seed(2, "m", "d#0", "delta"),
        S.tensor_seed(1, "n", "d#0", "delta"),
        S.tensor_seed(1, "m", "d#1", "delta"),
        S.tensor_seed(1, "m", "d#0", "A"),
    }
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63
