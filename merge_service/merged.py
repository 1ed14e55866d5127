"""A merged adapter: what a build makes, the cache keeps (memory and disk) and Merge streams.

One type for all three, so nothing is converted between the pipeline, the cache and the servicer.
``record_json`` and ``device`` are known only to the build that made it; an adapter read back from the
disk cache has ``record_json`` empty (the cache's manifest does not keep them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class ModuleStat(NamedTuple):
    """Per-module statistics of a merged adapter, as the Merge header reports them."""

    name: str
    rank: int
    relative_error: float


@dataclass(frozen=True)
class MergedAdapter:
    merge_key: str
    config_json: str
    data: bytes  # adapter_model.safetensors bytes
    sha256: str
    rank: int
    modules: tuple[ModuleStat, ...]
    base_model: str
    build_seconds: float
    device: str = "cpu"
    record_json: str = ""  # the sidecar loramerge.json: how this adapter was made

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)
