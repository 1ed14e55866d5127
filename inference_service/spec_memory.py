"""Remembered request spec -> merge key pairs, and when to confirm them again with the merge service.

A spec seen before (same fingerprint, inference_service/request_specs.py) maps to the merge key the
merge service streamed for it, so a repeated request finds its loaded adapter without a call. What
a spec names can change under it (a hub branch, an S3 object, a local folder), so once ``ttl``
seconds have passed since the key was last confirmed, the next request asks the merge service's
Plan (sources resolved, nothing built) again: the same key keeps the loaded adapter, a new key is
fetched as for a new spec. Specs naming only fixed content (hub commits, S3 revisions) are never
re-checked. A merge service that cannot answer leaves the remembered key in place (stale but
available) until another TTL has passed; one that says the spec no longer resolves forgets it and
fails the request. Concurrent requests for one spec share one Plan call (single flight).

At most ``entries`` pairs are kept, the least recently used forgotten first.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from inference_service.metrics import InferenceMetrics
from inference_service.request_specs import describe_spec
from inference_service.singleflight import SingleFlight
from loramerge.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoramergeError,
    NotFound,
    PermissionDenied,
)
from loramerge.v1 import merge_pb2

log = logging.getLogger(__name__)

# What a merge service answers when the spec itself no longer resolves: a new request would get the
# same error, so a re-check passes it on rather than serving an adapter for content that is gone.
SPEC_ERRORS = (InvalidArgument, NotFound, FailedPrecondition, PermissionDenied)


class Planner(Protocol):
    async def plan(
        self, spec: merge_pb2.MergeSpec, *, deadline: float, field_namer: Callable[[str], str] = ...
    ) -> str: ...


@dataclass
class SpecKey:
    """The merge key a request spec resolved to, and when the merge service last confirmed it."""

    merge_key: str
    checked_at: float  # the memory's clock
    pinned: bool  # names only fixed content: never re-checked


class SpecMemory:
    def __init__(
        self,
        planner: Planner,
        *,
        entries: int = 4096,
        ttl: float = 0.0,
        recheck_timeout: float = 2.0,
        metrics: InferenceMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ttl``: seconds after which a pair is confirmed again (0: never); ``recheck_timeout``
        bounds that call. ``clock`` measures the TTL (tests pass a fake one)."""
        if ttl < 0:
            raise InvalidArgument(f"spec_ttl_seconds must be >= 0, got {ttl}", field="spec_ttl_seconds")
        if recheck_timeout <= 0:
            raise InvalidArgument(
                f"spec_recheck_timeout_seconds must be > 0, got {recheck_timeout}",
                field="spec_recheck_timeout_seconds",
            )
        self.planner = planner
        self.entries = entries
        self.ttl = ttl
        self.recheck_timeout = recheck_timeout
        self.metrics = metrics
        self.clock = clock
        self._keys: OrderedDict[str, SpecKey] = OrderedDict()  # by spec fingerprint, LRU first
        self.rechecks: SingleFlight[str, str] = SingleFlight()

    def get(self, fingerprint: str) -> SpecKey | None:
        return self._keys.get(fingerprint)

    def touch(self, fingerprint: str) -> None:
        if fingerprint in self._keys:
            self._keys.move_to_end(fingerprint)

    def remember(self, fingerprint: str, merge_key: str, pinned: bool) -> None:
        self._keys[fingerprint] = SpecKey(merge_key, self.clock(), pinned)
        self._keys.move_to_end(fingerprint)
        while len(self._keys) > self.entries:
            self._keys.popitem(last=False)

    def due(self, known: SpecKey) -> bool:
        """Whether ``known`` must be confirmed with the merge service before it is used."""
        return bool(self.ttl) and not known.pinned and self.clock() - known.checked_at >= self.ttl

    async def recheck(
        self,
        spec: merge_pb2.MergeSpec,
        fingerprint: str,
        known: SpecKey,
        deadline: float,
        field_namer: Callable[[str], str],
    ) -> str:
        """The merge key ``spec`` resolves to now (``known``'s when the merge service cannot say).
        Concurrent callers for one spec share one Plan call."""
        deadline = min(deadline, time.monotonic() + self.recheck_timeout)
        flight, _ = self.rechecks.start(
            fingerprint, lambda publish: self._confirm(spec, fingerprint, known, deadline, field_namer)
        )
        return await self.rechecks.wait(flight)

    async def _confirm(
        self,
        spec: merge_pb2.MergeSpec,
        fingerprint: str,
        known: SpecKey,
        deadline: float,
        field_namer: Callable[[str], str],
    ) -> str:
        """Ask the merge service which key ``spec`` resolves to now and remember the answer."""
        try:
            key = await self.planner.plan(spec, deadline=deadline, field_namer=field_namer)
        except SPEC_ERRORS:
            self._keys.pop(fingerprint, None)
            self._count("failed")
            raise
        except LoramergeError as e:  # unreachable, overloaded, broken: keep serving what is loaded
            known.checked_at = self.clock()  # and ask again after another TTL, not on every request
            self._count("unreachable")
            log.warning(
                "could not re-check a request spec with the merge service; serving the loaded adapter",
                extra={"merge_key": known.merge_key, "spec": describe_spec(spec), "error": e.message},
            )
            return known.merge_key
        if key == known.merge_key:
            self._count("same")
        else:
            self._count("changed")
            log.info(
                "request spec resolves to a new merge key",
                extra={"spec": describe_spec(spec), "old_merge_key": known.merge_key, "merge_key": key},
            )
        self.remember(fingerprint, key, known.pinned)
        return key

    def _count(self, result: str) -> None:
        if self.metrics:
            self.metrics.spec_rechecks.labels(result=result).inc()
