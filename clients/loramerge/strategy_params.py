"""Which merge strategies exist and which spec fields each reads, from the contract itself.

``merge.proto`` declares a ``(strategy_params)`` option on every ``MergeStrategy`` value; this module
reads it from the generated descriptor, so clients list strategies and know which need a density
without a copy of the list (the merge service's registry declares the same, checked by a test).
Names are the lower-case enum names ("dare_ties"), as the CLI and the merge service spell them.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramerge.v1 import merge_pb2


@dataclass(frozen=True)
class StrategyInfo:
    name: str  # "ties"
    number: int  # the MergeStrategy value
    density: bool  # reads (and requires) density
    sign_method: bool  # reads majority_sign_method
    seed: bool  # draws random masks from seed


def _read() -> dict[str, StrategyInfo]:
    out = {}
    for value in merge_pb2.MergeStrategy.DESCRIPTOR.values:
        options = value.GetOptions()
        if not options.HasExtension(merge_pb2.strategy_params):
            continue  # MERGE_STRATEGY_UNSPECIFIED
        p = options.Extensions[merge_pb2.strategy_params]
        name = value.name.lower()
        out[name] = StrategyInfo(name, value.number, p.density, p.majority_sign_method, p.seed)
    return out


STRATEGY_INFO: dict[str, StrategyInfo] = _read()
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_INFO)  # in enum order
DENSITY_STRATEGIES: frozenset[str] = frozenset(n for n, s in STRATEGY_INFO.items() if s.density)
