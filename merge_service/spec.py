"""What a merge request asks for, independent of the wire format.

The servicer converts protobuf messages into these; the offline CLI builds
them from flags. Validation that needs no I/O lives here (``MergeSpec.validate``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from enum import StrEnum

from loramerge.errors import FailedPrecondition, InvalidArgument, shown
from merge_service import strategies
from merge_service.strategies import SignMethod, Strategy

__all__ = ["AdapterRef", "Dtype", "MergeSpec", "SignMethod", "SourceKind", "Space", "Strategy", "f32"]

MAX_SEED = 2**64 - 1
F32_MAX = 3.4028234663852886e38  # weights travel as float32


def f32(x: float) -> float:
    """x rounded to the nearest float32 (the precision weights and density have on the wire)."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


class SourceKind(StrEnum):
    AUTO = "auto"  # s3://... -> S3, a directory under the adapter root -> LOCAL, else HUB
    HUB = "hub"
    LOCAL = "local"
    S3 = "s3"


class Space(StrEnum):
    DELTA = "delta"
    FACTORS = "factors"


class Dtype(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


@dataclass(frozen=True)
class AdapterRef:
    id: str
    source: SourceKind = SourceKind.AUTO
    revision: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class MergeSpec:
    adapters: tuple[AdapterRef, ...]
    strategy: Strategy = Strategy.LINEAR
    density: float | None = None
    sign_method: SignMethod = SignMethod.TOTAL
    seed: int | None = None
    space: Space = Space.DELTA
    target_rank: int = 0  # 0: exact rank where possible, capped by max_rank
    dtype: Dtype = Dtype.FLOAT32
    max_rank: int = 0  # 0: no limit

    def validate(self) -> None:
        """Check everything that needs no I/O; raise InvalidArgument (or FailedPrecondition for a rank
        above max_rank) naming the field and the offending value."""
        if not self.adapters:
            raise InvalidArgument(
                "spec.adapters must name at least one adapter, got none", field="spec.adapters"
            )
        for i, ref in enumerate(self.adapters):
            if not isinstance(ref.id, str) or not ref.id.strip():
                raise InvalidArgument(
                    f"spec.adapters[{i}].id must be non-empty, got {shown(ref.id)}",
                    field=f"spec.adapters[{i}].id",
                )
            w = ref.weight
            if (
                isinstance(w, bool)
                or not isinstance(w, int | float)
                or not math.isfinite(w)
                or abs(w) > F32_MAX
            ):
                raise InvalidArgument(
                    f"spec.adapters[{i}].weight must be a finite number, got {shown(w)}",
                    field=f"spec.adapters[{i}].weight",
                )
        name = str(self.strategy)
        if name not in strategies.REGISTRY:
            raise InvalidArgument(
                f"spec.merge_strategy must be one of {sorted(strategies.REGISTRY)}, got {shown(name)}",
                field="spec.merge_strategy",
            )
        strategy = strategies.get(name)
        if strategy.uses_density:
            d = self.density
            if d is None:
                raise InvalidArgument(
                    f"spec.density is required by strategy {shown(name)}: a fraction in (0, 1] of "
                    "values to keep",
                    field="spec.density",
                )
            if isinstance(d, bool) or not isinstance(d, int | float) or not (math.isfinite(d) and 0 < d <= 1):
                raise InvalidArgument(f"spec.density must be in (0, 1], got {shown(d)}", field="spec.density")
        if str(self.sign_method) not in {m.value for m in SignMethod}:
            raise InvalidArgument(
                f"spec.majority_sign_method must be one of {[m.value for m in SignMethod]}, "
                f"got {shown(self.sign_method)}",
                field="spec.majority_sign_method",
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise InvalidArgument(
                f"spec.seed must be an integer in [0, 2^64), got {shown(self.seed)}", field="spec.seed"
            )
        for fname, enum in (("space", Space), ("dtype", Dtype)):
            value = getattr(self, fname)
            if str(value) not in {m.value for m in enum}:
                raise InvalidArgument(
                    f"spec.{fname} must be one of {[m.value for m in enum]}, got {shown(value)}",
                    field=f"spec.{fname}",
                )
        for fname in ("target_rank", "max_rank"):
            value = getattr(self, fname)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(
                    f"spec.{fname} must be a non-negative integer, got {shown(value)}", field=f"spec.{fname}"
                )
        if self.max_rank and self.target_rank > self.max_rank:
            raise FailedPrecondition(
                f"spec.target_rank {self.target_rank} exceeds max_rank {self.max_rank} "
                "(the highest rank the engine can load)",
                field="spec.target_rank",
            )

    def normalized(self) -> MergeSpec:
        """This spec with enums coerced, weights and density rounded to float32 (their wire precision),
        and parameters the strategy does not read dropped (density, seed) or reset (sign method)."""
        strategy = strategies.get(str(self.strategy))
        return replace(
            self,
            adapters=tuple(
                replace(a, source=SourceKind(a.source), weight=f32(a.weight)) for a in self.adapters
            ),
            strategy=Strategy(strategy.name),
            density=f32(self.density) if strategy.uses_density and self.density is not None else None,
            sign_method=SignMethod(self.sign_method) if strategy.uses_sign_method else SignMethod.TOTAL,
            seed=self.seed if strategy.random else None,
            space=Space(self.space),
            dtype=Dtype(self.dtype),
        )
