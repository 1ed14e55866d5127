"""The contract every adapter source fulfils: turn a reference into local files plus a digest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loramerge.errors import FailedPrecondition, LoramergeError, NotFound, ResourceExhausted, shown
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service.spec import AdapterRef, SourceKind

PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # refused, never opened


@dataclass(frozen=True)
class ResolvedSource:
    """An adapter pinned to one content version, with its two files on local disk."""

    id: str
    kind: SourceKind  # never AUTO
    revision: str  # hub commit, S3 ETag/version id, "" for local
    digest: str  # identifies the content; part of the merge key
    path: Path  # directory holding CONFIG_FILE and WEIGHTS_FILE
    nbytes: int = 0  # size of the two files together


class Source(Protocol):
    kind: SourceKind

    def resolve(self, ref: AdapterRef) -> ResolvedSource: ...


def check_size(adapter_id: str, nbytes: int, max_bytes: int | None, field: str = "adapter") -> None:
    """ResourceExhausted when an adapter's files exceed ``max_bytes`` (None or 0: no limit)."""
    if max_bytes and nbytes > max_bytes:
        raise ResourceExhausted(
            f"adapter {shown(adapter_id)}: its files total {nbytes} bytes, more than the {max_bytes} allowed "
            "(max_adapter_bytes)",
            field=field,
        )


def pickled_only_error(adapter_id: str, field: str = "adapter") -> LoramergeError:
    return FailedPrecondition(
        f"adapter {shown(adapter_id)}: has only pickled {PICKLED_WEIGHTS_FILE} weights, which are "
        "never loaded; "
        f"convert them to {WEIGHTS_FILE}",
        field=field,
    )


def missing_weights_error(directory: Path, adapter_id: str, field: str = "adapter") -> LoramergeError:
    """FailedPrecondition when only pickled weights are there (never opened), else NotFound."""
    if (directory / PICKLED_WEIGHTS_FILE).exists():
        return pickled_only_error(adapter_id, field)
    return NotFound(f"adapter {shown(adapter_id)}: has no {WEIGHTS_FILE}", field=field)


def content_digest(config_sha256: str, weights_sha256: str) -> str:
    """The content digest of an adapter's two files, "sha256:" + sha256 of "<config name> <hex>\n<weights
    name> <hex>\n": local and S3 sources use it (same bytes, same digest, same merge key), and builds
    recompute it from the bytes they read."""
    combined = f"{CONFIG_FILE} {config_sha256}\n{WEIGHTS_FILE} {weights_sha256}\n"
    return "sha256:" + hashlib.sha256(combined.encode()).hexdigest()
