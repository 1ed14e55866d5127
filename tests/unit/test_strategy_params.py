"""The strategy registry (merge service, offline) and merge.proto's MergeStrategy (remote clients) name
the same strategies with the same parameters: a new strategy is one registry entry plus its enum value."""

from __future__ import annotations

from loramerge.strategy_params import DENSITY_STRATEGIES, STRATEGIES, STRATEGY_INFO
from loramerge.v1 import merge_pb2
from merge_service import strategies
from merge_service.spec import Strategy
from merge_service.strategies import Param


def test_registry_and_proto_name_the_same_strategies() -> None:
    assert set(STRATEGIES) == set(strategies.REGISTRY)
    assert {s.value for s in Strategy} == set(strategies.REGISTRY)
    for name in strategies.REGISTRY:
        assert merge_pb2.MergeStrategy.Value(name.upper()) == STRATEGY_INFO[name].number


def test_registry_and_proto_declare_the_same_parameters() -> None:
    for name, definition in strategies.REGISTRY.items():
        info = STRATEGY_INFO[name]
        declared = {
            Param.DENSITY: info.density,
            Param.SIGN_METHOD: info.sign_method,
            Param.SEED: info.seed,
        }
        assert {p for p, used in declared.items() if used} == definition.params, name
    assert frozenset(n for n, d in strategies.REGISTRY.items() if d.uses_density) == DENSITY_STRATEGIES
