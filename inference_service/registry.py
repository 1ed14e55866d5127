"""The loaded-adapter registry: merge key -> adapter registered with vLLM (name, lora_int_id, folder).

- A spec seen before is looked up in the spec memory (inference_service/spec_memory.py: remembered
  spec -> merge key pairs, confirmed again with the merge service after a TTL); when its adapter is
  loaded it is served without calling the merge service.
- A new spec is fetched once, however many requests ask for it at the same time (single flight,
  inference_service/singleflight.py), verified, written into its own new folder and registered with
  ``add_lora`` under a new name and a new lora_int_id before any request uses it: a bad adapter
  fails that request, not the engine. Every waiter waits within its own deadline and names error
  fields its own way; the merge service's progress events reach every waiter while it waits.
- Two namespaces (trust): a merge key enters the registry only from the merge service's own stream.
  A pushed adapter (``LoadAdapter``) is filed under ``pushed:<sha256 of its bytes>`` (the receiver
  has verified that digest) and served only by that key or its name, never for a spec: the
  ``merge_key`` a pushed header claims is ignored, so a push cannot hijack anyone's merged spec.
- The number of registered adapters is bounded: the least recently used one that no running
  request holds is removed from vLLM and from disk. While every registered adapter is in use the
  bound is exceeded; releasing a lease then evicts back down to it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from inference_service.merge_client import Fetched
from inference_service.metrics import InferenceMetrics
from inference_service.receiver import AdapterLimits, AdapterWriter, Received, adapter_rank, receive
from inference_service.request_specs import (
    describe_spec,
    merged_spec_field,
    normalize_spec,
    spec_fingerprint,
    spec_pinned,
)
from inference_service.singleflight import Flight, SingleFlight
from inference_service.spec_memory import Planner, SpecMemory
from inference_service.vllm_engine import ZERO_ADAPTER_ID
from loramerge.errors import (
    DeadlineExceeded,
    FieldViolation,
    Internal,
    InvalidArgument,
    LoramergeError,
    NotFound,
    shown,
)
from loramerge.v1 import merge_pb2

log = logging.getLogger(__name__)
PUSHED_PREFIX = "pushed:"


def _spec_fields(field: str) -> str:
    return field


def _renamed(err: LoramergeError, namer: Callable[[str], str]) -> LoramergeError:
    """A copy of ``err`` (same class) with its spec-form field names ("spec.density") in the caller's
    terms, message included."""
    if namer is _spec_fields:
        return err

    def text(s: str) -> str:
        for v in err.violations:
            if v.field.startswith("spec."):  # (a bare "spec" would also match ordinary words)
                s = s.replace(v.field, namer(v.field))
        return s

    copy = type(err)(
        text(err.message),
        field=namer(err.field) if err.field else None,
        violations=[FieldViolation(namer(v.field), text(v.description)) for v in err.violations],
    )
    copy.code = err.code
    return copy


def pushed_key(sha256: str) -> str:
    """The registry key of a pushed adapter: its own namespace, never a merge key."""
    return f"{PUSHED_PREFIX}{sha256}"


class LoraEngine(Protocol):
    """What the registry needs from the engine (the real one is inference_service.vllm_engine.Engine)."""

    async def add_lora(self, name: str, lora_int_id: int, path: Path) -> None: ...

    async def remove_lora(self, lora_int_id: int) -> None: ...


class Fetcher(Planner, Protocol):
    """The merge service as the registry uses it: Plan (``Planner``) and a fetch into a writer."""

    async def fetch(
        self,
        spec: merge_pb2.MergeSpec,
        writer: AdapterWriter,
        *,
        deadline: float,
        field_namer: Callable[[str], str] = ...,
        on_progress: Callable[[merge_pb2.MergeProgress], None] | None = ...,
    ) -> Fetched: ...


@dataclass
class Entry:
    """One adapter registered with vLLM."""

    name: str
    merge_key: str
    lora_int_id: int
    path: Path
    rank: int
    bytes: int
    base_model: str
    description: str
    loaded_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    requests: int = 0
    leases: int = 0  # requests running with it; it is not removed while > 0
    removed: bool = False  # unregistered; files and vLLM slot go when the last lease ends


@dataclass(frozen=True)
class Usage:
    """How a request got its adapter (reported back in the response)."""

    entry: Entry
    already_loaded: bool
    merge_cache_hit: bool = False
    merge_ms: float = 0.0
    transfer_ms: float = 0.0
    load_ms: float = 0.0


class Lease:
    """Holds an entry while a request generates with it (``async with registry.for_spec(...) as usage``)."""

    def __init__(self, registry: AdapterRegistry, usage: Usage) -> None:
        self._registry = registry
        self.usage = usage

    async def __aenter__(self) -> Usage:
        return self.usage

    async def __aexit__(self, *exc: object) -> None:
        await self._registry._release(self.usage.entry)


class AdapterRegistry:
    def __init__(
        self,
        engine: LoraEngine,
        fetcher: Fetcher,
        *,
        adapter_dir: Path,
        limits: AdapterLimits,
        max_loaded: int,
        spec_cache_entries: int = 4096,
        spec_ttl: float = 0.0,
        recheck_timeout: float = 2.0,
        fetch_timeout_ceiling: float = 1800.0,
        metrics: InferenceMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``spec_cache_entries``, ``spec_ttl``, ``recheck_timeout`` and ``clock``: the spec memory's
        (inference_service/spec_memory.py). ``fetch_timeout_ceiling``: the longest a fetch may take; a
        caller without a deadline gets it."""
        if max_loaded < 1:
            raise InvalidArgument(
                f"max_loaded_adapters must be >= 1, got {max_loaded}", field="max_loaded_adapters"
            )
        self.specs = SpecMemory(
            fetcher,
            entries=spec_cache_entries,
            ttl=spec_ttl,
            recheck_timeout=recheck_timeout,
            metrics=metrics,
            clock=clock,
        )
        self.engine = engine
        self.fetcher = fetcher
        self.adapter_dir = adapter_dir
        self.limits = limits
        self.max_loaded = max_loaded
        self.fetch_timeout_ceiling = fetch_timeout_ceiling
        self.metrics = metrics
        self._by_key: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._fetches: SingleFlight[str, Usage] = SingleFlight()  # by spec fingerprint
        self._abandoned: LoramergeError | None = None
        self._ids = itertools.count(ZERO_ADAPTER_ID + 1)
        self._lock = asyncio.Lock()
        adapter_dir.mkdir(parents=True, exist_ok=True)

    # -- lookups -----------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return list(self._by_key.values())

    def get(self, merge_key: str = "", name: str = "") -> Entry | None:
        if merge_key:
            return self._by_key.get(merge_key)
        return next((e for e in self._by_key.values() if e.name == name), None)

    def for_key(self, merge_key: str) -> Lease:
        """A loaded adapter by merge key; NotFound when it is not loaded."""
        entry = self._by_key.get(merge_key)
        if entry is None:
            raise NotFound(
                f"merge_key {shown(merge_key)} is not loaded (push it with LoadAdapter or request "
                "it by spec)",
                field="merge_key",
            )
        self._count("loaded")
        return self._lease(Usage(entry, already_loaded=True))

    async def for_spec(
        self,
        spec: merge_pb2.MergeSpec,
        *,
        deadline: float | None = None,
        field_namer: Callable[[str], str] = merged_spec_field,
        on_progress: Callable[[merge_pb2.MergeProgress], None] | None = None,
    ) -> Lease:
        """The adapter for ``spec``: loaded already, or fetched from the merge service and registered.

        ``deadline`` (time.monotonic()) bounds this caller's wait, capped at ``fetch_timeout_ceiling``
        (a caller without one gets the ceiling); a fetch this call starts runs under it, retries
        included. ``on_progress`` gets the merge service's progress events while a fetch runs.
        """
        if self._abandoned is not None:
            raise self._abandoned
        spec = normalize_spec(spec, self.limits.max_rank)
        fingerprint = spec_fingerprint(spec)
        ceiling = time.monotonic() + self.fetch_timeout_ceiling
        deadline = ceiling if deadline is None else min(deadline, ceiling)
        for _ in range(3):  # an entry can be evicted between its fetch finishing and our lease
            known = self.specs.get(fingerprint)
            entry = self._by_key.get(known.merge_key) if known else None
            if entry is not None and known is not None and self.specs.due(known):
                key = await self.specs.recheck(spec, fingerprint, known, deadline, field_namer)
                entry = self._by_key.get(key)
            if entry is not None:
                self.specs.touch(fingerprint)
                self._count("loaded")
                return self._lease(Usage(entry, already_loaded=True))
            # The shared fetch names fields in spec terms; each waiter renames them its own way
            # (a joiner may come from another front-end or name the spec differently).
            flight, started = self._fetches.start(
                fingerprint,
                lambda publish: self._fetch_and_register(spec, fingerprint, deadline, _spec_fields, publish),
            )
            self._count("fetched" if started else "joined")
            try:
                usage = await self._wait(flight, deadline, spec, on_progress)
            except DeadlineExceeded as e:
                # The fetch ran under the first caller's deadline; a joiner with time left fetches again.
                if time.monotonic() < deadline and flight.done() and fingerprint not in self._fetches:
                    continue
                raise _renamed(e, field_namer) from None
            except LoramergeError as e:
                raise _renamed(e, field_namer) from None
            if not usage.entry.removed:
                return self._lease(usage)
        raise LoramergeError(f"adapter for {describe_spec(spec)} was evicted repeatedly while loading")

    async def load_pushed(self, chunks: AsyncIterator[merge_pb2.MergeChunk]) -> Usage:
        """Register an adapter pushed in the Merge chunk format (``LoadAdapter``)."""
        lora_int_id = next(self._ids)
        writer = AdapterWriter(self.adapter_dir / f"{lora_int_id:08d}-{uuid.uuid4().hex[:8]}", self.limits)
        try:
            received = await receive(chunks, writer)
        except BaseException:
            writer.discard()
            raise
        # The header's merge_key is ignored: only the merge service's stream may file a merge key.
        key = pushed_key(received.header.sha256)
        return await self._register(received, key, lora_int_id, "pushed adapter", via="push")

    async def unload(self, merge_key: str = "", name: str = "") -> bool:
        """Unregister by merge key or name; the files and vLLM slot go once no request holds it."""
        async with self._lock:
            entry = self.get(merge_key, name)
            if entry is None:
                return False
            await self._remove(entry, reason="request")
            return True

    def abandon(self, error: LoramergeError) -> None:
        """Fail every request waiting on a fetch or re-check, and every later one, with ``error``
        (the engine has died: nothing fetched now could be served)."""
        self._abandoned = error
        self._fetches.abandon(error)
        self.specs.rechecks.abandon(error)

    async def close(self) -> None:
        """Cancel fetches in flight and remove every adapter folder (the engine is going away)."""
        self._fetches.cancel_all()
        self.specs.rechecks.cancel_all()
        for entry in list(self._by_key.values()):
            shutil.rmtree(entry.path, ignore_errors=True)
        self._by_key.clear()

    # -- internals ---------------------------------------------------------------------------

    async def _wait(
        self,
        flight: Flight[Usage],
        deadline: float,
        spec: merge_pb2.MergeSpec,
        on_progress: Callable[[merge_pb2.MergeProgress], None] | None,
    ) -> Usage:
        """The shared fetch's result, within this caller's own deadline (the fetch keeps running)."""
        try:
            return await self._fetches.wait(flight, deadline - time.monotonic(), on_progress)  # type: ignore[arg-type]
        except TimeoutError:
            failure = flight.failure()
            if failure is not None:
                raise failure from None
            raise DeadlineExceeded(
                f"deadline exceeded waiting for the merge of {describe_spec(spec)}", field="spec"
            ) from None

    def _lease(self, usage: Usage) -> Lease:
        entry = usage.entry
        entry.leases += 1
        entry.requests += 1
        entry.last_used_at = time.time()
        if not entry.removed:
            self._by_key.move_to_end(entry.merge_key)
        return Lease(self, usage)

    async def _release(self, entry: Entry) -> None:
        entry.leases -= 1
        if entry.removed and entry.leases == 0:
            await self._drop(entry)
        elif len(self._by_key) > self.max_loaded:  # went over the bound while all were in use
            async with self._lock:
                # Spare adapters never leased yet: their fetch's waiters are about to use them.
                await self._evict_down_to(self.max_loaded, spare_unused=True)

    async def _fetch_and_register(
        self,
        spec: merge_pb2.MergeSpec,
        fingerprint: str,
        deadline: float,
        field_namer: Callable[[str], str],
        publish: Callable[[object], None],
    ) -> Usage:
        lora_int_id = next(self._ids)
        writer = AdapterWriter(self.adapter_dir / f"{lora_int_id:08d}-{uuid.uuid4().hex[:8]}", self.limits)
        try:
            fetched = await self.fetcher.fetch(
                spec, writer, deadline=deadline, field_namer=field_namer, on_progress=publish
            )
        except BaseException as e:
            writer.discard()
            if self.metrics:
                outcome = e.code.name if isinstance(e, LoramergeError) else type(e).__name__
                self.metrics.merge_calls.labels(outcome=outcome).inc()
            raise
        if self.metrics:
            self.metrics.merge_calls.labels(outcome="OK").inc()
            self.metrics.fetch_seconds.labels(phase="merge").observe(fetched.received.header_ms / 1e3)
            self.metrics.fetch_seconds.labels(phase="transfer").observe(fetched.received.transfer_ms / 1e3)
        received = fetched.received
        key = received.header.merge_key
        if not key or key.startswith(PUSHED_PREFIX):
            writer.discard()
            # The merge service broke the protocol: a server fault, not the caller's (not INVALID_ARGUMENT).
            raise Internal(
                f"the merge service sent a header with merge_key {shown(key)} (empty or in the pushed "
                "namespace)",
                field="header.merge_key",
            )
        self.specs.remember(fingerprint, key, spec_pinned(spec))
        usage = await self._register(received, key, lora_int_id, describe_spec(spec), via="merge")
        return Usage(
            usage.entry,
            already_loaded=usage.already_loaded,
            merge_cache_hit=received.header.cache_hit,
            merge_ms=received.header_ms,
            transfer_ms=received.transfer_ms,
            load_ms=usage.load_ms,
        )

    async def _register(
        self, received: Received, key: str, lora_int_id: int, description: str, via: str
    ) -> Usage:
        """add_lora the received folder under a new name and id, then evict down to the bound (LRU)."""
        async with self._lock:
            existing = self._by_key.get(key)
            if existing is not None:  # another spelling of the same merge got here first
                shutil.rmtree(received.directory, ignore_errors=True)
                return Usage(existing, already_loaded=True)
            short = key.removeprefix(PUSHED_PREFIX)[:16]
            name = (
                f"pushed-{short}-{lora_int_id}" if key.startswith(PUSHED_PREFIX) else f"{short}-{lora_int_id}"
            )
            t0 = time.perf_counter()
            try:
                await self.engine.add_lora(name, lora_int_id, received.directory)
            except BaseException:
                shutil.rmtree(received.directory, ignore_errors=True)
                if self.metrics:
                    self.metrics.adapter_loads.labels(via=via, outcome="rejected").inc()
                raise
            load_ms = (time.perf_counter() - t0) * 1e3
            entry = Entry(
                name=name,
                merge_key=key,
                lora_int_id=lora_int_id,
                path=received.directory,
                rank=received.header.rank or adapter_rank(received.config),
                bytes=received.bytes,
                base_model=received.header.base_model
                or str(received.config.get("base_model_name_or_path", "")),
                description=description,
            )
            # Evict only once the new adapter is in: a rejected one must not cost a loaded one.
            await self._make_room()
            self._by_key[key] = entry
            self._update_gauges()
        if self.metrics:
            self.metrics.adapter_loads.labels(via=via, outcome="ok").inc()
            self.metrics.fetch_seconds.labels(phase="load").observe(load_ms / 1e3)
        log.info(
            "adapter loaded",
            extra={
                "adapter": name,
                "merge_key": key,
                "lora_int_id": lora_int_id,
                "via": via,
                "load_ms": load_ms,
            },
        )
        return Usage(entry, already_loaded=False, load_ms=load_ms)

    async def _make_room(self) -> None:
        """Evict least recently used adapters no request holds until one more fits. Adapters in use
        are never evicted; if all are in use the bound is exceeded until they are released."""
        if not await self._evict_down_to(self.max_loaded - 1):
            log.warning("all %d loaded adapters are in use; going over the bound", len(self._by_key))

    async def _evict_down_to(self, count: int, spare_unused: bool = False) -> bool:
        """Evict least recently used adapters no request holds until at most ``count`` are registered;
        False when the ones left are all in use (or, with ``spare_unused``, never used yet)."""
        while len(self._by_key) > count:
            victim = next(
                (e for e in self._by_key.values() if e.leases == 0 and (e.requests or not spare_unused)), None
            )
            if victim is None:
                return False
            await self._remove(victim, reason="lru")
        return True

    async def _remove(self, entry: Entry, reason: str) -> None:
        self._by_key.pop(entry.merge_key, None)
        entry.removed = True
        if self.metrics:
            self.metrics.evictions.labels(reason=reason).inc()
        if entry.leases == 0:
            await self._drop(entry)
        self._update_gauges()

    async def _drop(self, entry: Entry) -> None:
        await self.engine.remove_lora(entry.lora_int_id)
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("adapter unloaded", extra={"adapter": entry.name, "merge_key": entry.merge_key})

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.loaded.set(len(self._by_key))
            self.metrics.loaded_bytes.set(sum(e.bytes for e in self._by_key.values()))

    def _count(self, result: str) -> None:
        if self.metrics:
            self.metrics.adapter_lookups.labels(result=result).inc()
