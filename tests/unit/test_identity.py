"""The merge key: canonical, order-free, float32-exact, and blind to parameters a strategy ignores."""

from __future__ import annotations

from dataclasses import replace

from merge_service.identity import ALGORITHM_VERSION, canonical, derived_seed, f32, merge_key
from merge_service.spec import AdapterRef, Dtype, MergeSpec, SignMethod, Space, Strategy

D = ["sha256:aa", "sha256:bb", "sha256:cc"]


def spec(**kw) -> MergeSpec:
    adapters = (AdapterRef("x", weight=0.5), AdapterRef("y", weight=1.0), AdapterRef("z", weight=-0.25))
    return MergeSpec(adapters=adapters, **kw).normalized()


def test_key_is_hex_sha256_and_stable() -> None:
    k = merge_key(spec(), D, 16)
    assert len(k) == 64 and int(k, 16) >= 0
    assert k == merge_key(spec(), D, 16)
    assert canonical(spec(), D, 16)["algorithm_version"] == ALGORITHM_VERSION


def test_adapter_order_does_not_matter_but_pairing_does() -> None:
    s = spec()
    perm = replace(s, adapters=(s.adapters[2], s.adapters[0], s.adapters[1]))
    assert merge_key(perm, [D[2], D[0], D[1]], 16) == merge_key(s, D, 16)
    assert merge_key(s, [D[1], D[0], D[2]], 16) != merge_key(s, D, 16)  # weights moved to other adapters


def test_every_relevant_parameter_changes_the_key() -> None:
    base = spec(strategy=Strategy.DARE_TIES, density=0.5, seed=1)
    k = merge_key(base, D, 16)
    variants = [
        merge_key(base, D, 8),
        merge_key(replace(base, density=f32(0.6)), D, 16),
        merge_key(replace(base, seed=2), D, 16),
        merge_key(replace(base, sign_method=SignMethod.FREQUENCY), D, 16),
        merge_key(replace(base, space=Space.FACTORS), D, 16),
        merge_key(replace(base, dtype=Dtype.BFLOAT16), D, 16),
        merge_key(replace(base, strategy=Strategy.TIES, seed=None), D, 16),
        merge_key(base, ["sha256:ab", D[1], D[2]], 16),
    ]
    assert k not in variants and len(set(variants)) == len(variants)


def test_ignored_parameters_do_not_change_the_key() -> None:
    plain = spec()
    noisy = spec(density=0.3, seed=99, sign_method=SignMethod.FREQUENCY, target_rank=0)
    assert merge_key(plain, D, 16) == merge_key(noisy, D, 16)
    ties = spec(strategy=Strategy.TIES, density=0.5)
    assert merge_key(ties, D, 16) == merge_key(spec(strategy=Strategy.TIES, density=0.5, seed=3), D, 16)


def test_float64_and_float32_weights_give_one_key() -> None:
    wire = spec()
    cli = MergeSpec(
        adapters=(AdapterRef("x", weight=0.5), AdapterRef("y", weight=1.0), AdapterRef("z", weight=-0.25))
    )
    assert merge_key(cli.normalized(), D, 16) == merge_key(wire, D, 16)
    a = MergeSpec(adapters=(AdapterRef("x", weight=0.1),), strategy=Strategy.TIES, density=0.3).normalized()
    b = MergeSpec(
        adapters=(AdapterRef("x", weight=f32(0.1)),), strategy=Strategy.TIES, density=f32(0.3)
    ).normalized()
    assert merge_key(a, D[:1], 4) == merge_key(b, D[:1], 4)


def test_derived_seed_is_deterministic_and_spec_dependent() -> None:
    s = spec(strategy=Strategy.DARE_LINEAR, density=0.5)
    seed = derived_seed(s, D, 16)
    assert seed == derived_seed(s, D, 16) and 0 <= seed < 2**63
    assert seed != derived_seed(replace(s, density=f32(0.7)), D, 16)
    assert seed != derived_seed(s, ["sha256:zz", D[1], D[2]], 16)
