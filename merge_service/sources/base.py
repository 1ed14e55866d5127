"""The contract every adapter source fulfils: turn a reference into local files plus a digest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from merge_service.spec import AdapterRef, SourceKind

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class ResolvedSource:
    """An adapter pinned to one content version, with its two files on local disk."""

    id: str
    kind: SourceKind  # never AUTO
    revision: str  # hub commit, S3 ETag/version id, "" for local
    digest: str  # identifies the content; part of the merge key
    path: Path  # directory holding CONFIG_FILE and WEIGHTS_FILE


class Source(Protocol):
    kind: SourceKind

    def resolve(self, ref: AdapterRef) -> ResolvedSource: ...
