"""What a merge request asks for, independent of the wire format.

The servicer converts protobuf messages into these; the offline CLI builds
them from flags. Validation that needs no I/O lives here (``MergeSpec.validate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class SourceKind(StrEnum):
    AUTO = "auto"  # s3://... -> S3, a directory under the adapter root -> LOCAL, else HUB
    HUB = "hub"
    LOCAL = "local"
    S3 = "s3"


class Strategy(StrEnum):
    LINEAR = "linear"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"
    MAGNITUDE_PRUNE = "magnitude_prune"


class SignMethod(StrEnum):
    TOTAL = "total"
    FREQUENCY = "frequency"


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
    extra: dict[str, float] = field(default_factory=dict)  # parameters of strategies added later
