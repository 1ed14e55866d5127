"""Where adapters come from: one ``Source`` per ``SourceKind``, chosen by ``SourceResolver``.

AUTO picks the source from the id: ``s3://...`` → S3; an entry under the adapter root (or an id that
could only be a path: absolute, "~...", or with "..", so that it is refused as one) → LOCAL; anything
else → HUB. A local directory therefore wins over a hub repo of the same name. Sources are kept in a dict
keyed by kind, so the S3 source is one ``register`` call.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loramerge.errors import FailedPrecondition, InvalidArgument, LoramergeError, shown
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service.sources.base import ResolvedSource, Source, check_size
from merge_service.sources.hub import HubSource
from merge_service.sources.local import LocalSource
from merge_service.spec import AdapterRef, SourceKind

__all__ = ["HubSource", "LocalSource", "ResolvedSource", "Source", "SourceResolver"]


def _with_field(err: LoramergeError, field: str) -> LoramergeError:
    """The same error, attributed to the request field that named the adapter."""
    return type(err)(err.message, field=field)


class SourceResolver:
    def __init__(
        self,
        adapter_root: Path | None,
        hub_token: str | None = None,
        hub_cache_dir: Path | None = None,
        max_adapter_bytes: int | None = None,
        hub_endpoint: str | None = None,
    ) -> None:
        self.adapter_root = Path(adapter_root) if adapter_root else None
        self.max_adapter_bytes = max_adapter_bytes
        self._sources: dict[SourceKind, Source] = {}
        if self.adapter_root is not None:
            self.register(LocalSource(self.adapter_root, max_adapter_bytes))
        self.register(HubSource(hub_token, hub_cache_dir, max_adapter_bytes, endpoint=hub_endpoint))

    def register(self, source: Source) -> None:
        """Add or replace the source for ``source.kind``."""
        if source.kind == SourceKind.AUTO:
            raise ValueError("a source serves one concrete kind, not AUTO")
        self._sources[source.kind] = source

    def source(self, kind: SourceKind) -> Source | None:
        return self._sources.get(kind)

    def detect(self, ref: AdapterRef) -> SourceKind:
        """The kind AUTO stands for, for this id."""
        if ref.source != SourceKind.AUTO:
            return ref.source
        aid = ref.id
        if aid.startswith("s3://"):
            return SourceKind.S3
        local = self._sources.get(SourceKind.LOCAL)
        if isinstance(local, LocalSource) and (local.is_path_like(aid) or local.exists(aid)):
            return SourceKind.LOCAL
        return SourceKind.HUB

    def resolve(self, ref: AdapterRef, field: str = "adapter") -> ResolvedSource:
        """Pin ``ref`` to one content version with its files on local disk; errors name ``field``."""
        try:
            if not ref.id:
                raise InvalidArgument("adapter id is empty", field=field)
            kind = self.detect(ref)
            source = self._sources.get(kind)
            if source is None:
                what = "no adapter root is configured" if kind == SourceKind.LOCAL else "it is not configured"
                raise FailedPrecondition(
                    f"adapter {shown(ref.id)}: {kind.value} adapters cannot be used on this server ({what})",
                    field=field,
                )
            resolved = source.resolve(ref)
            if resolved.nbytes:
                nbytes = resolved.nbytes
            else:
                nbytes = sum((resolved.path / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE))
                resolved = dataclasses.replace(resolved, nbytes=nbytes)
            check_size(ref.id, nbytes, self.max_adapter_bytes)
            return resolved
        except LoramergeError as e:
            raise _with_field(e, field) from None
