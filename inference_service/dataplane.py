"""The inference data plane: one request -> adapter choice -> registry lease -> engine -> steps.

Every front-end (gRPC, OpenAI-compatible HTTP, LoRAX-compatible HTTP) turns its own request into a
``GenerateRequest`` and calls ``DataPlane.generate``; so one request gives the same tokens on each
API, and the front-ends only parse, call and map errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from inference_service import sampling
from inference_service.chat import ChatTemplate
from inference_service.metrics import InferenceMetrics
from inference_service.recipes import RecipeBook
from inference_service.registry import AdapterRegistry, Lease, Usage
from inference_service.request_specs import single_adapter_field, single_adapter_spec
from inference_service.vllm_engine import Engine
from loramerge.errors import InvalidArgument, Unavailable
from loramerge.v1 import inference_pb2, merge_pb2

log = logging.getLogger(__name__)

DEADLINE_MARGIN_S = 0.1  # answer UNAVAILABLE before the caller's own deadline cuts the call
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs


@dataclass(frozen=True)
class TopToken:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token and, when asked for, its best alternatives."""

    token_id: int
    text: str
    logprob: float
    top: tuple[TopToken, ...] = ()


@dataclass
class Step:
    """One increment of a generation."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None
    usage: Usage | None = None  # set on the first step only
    completion_tokens: int = 0  # running total
    request_id: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_reason: int | str | None = None  # the stop string or token id that ended it; None for EOS
    prompt_token_ids: list[int] = field(default_factory=list)  # set on the first step only
    # Set, with nothing else but request_id, on steps before the first token while the adapter is
    # being merged (only for ``generate(..., merge_progress=True)``).
    merge_progress: merge_pb2.MergeProgress | None = None


class DataPlane:
    """Shared by every front-end: the engine, the adapter registry, recipes and the chat template."""

    def __init__(
        self,
        *,
        metrics: InferenceMetrics | None = None,
        fetch_timeout_ceiling_seconds: float = 1800.0,
        recipes: RecipeBook | None = None,
    ) -> None:
        self.registry: AdapterRegistry | None = None
        self.engine: Engine | None = None
        self.chat: ChatTemplate | None = None
        self.metrics = metrics
        self.fetch_timeout_ceiling_seconds = fetch_timeout_ceiling_seconds
        self.recipes = recipes or RecipeBook()

    def attach(self, engine: Engine, registry: AdapterRegistry, chat: ChatTemplate | None = None) -> None:
        """The engine is ready: start serving (calls before this get UNAVAILABLE)."""
        self.engine = engine
        self.registry = registry
        self.chat = chat

    def ready(self) -> tuple[AdapterRegistry, Engine]:
        if self.engine is None or self.registry is None:
            raise Unavailable("the inference engine is still starting; retry shortly")
        return self.registry, self.engine

    def prompt_of(self, request: inference_pb2.GenerateRequest):
        """What vLLM is given: the prompt text, or the chat messages rendered and tokenized.

        Rendered chat is tokenized without adding special tokens (the template writes them, as
        vLLM's own chat serving assumes), so a template that opens with BOS gets exactly one."""
        if request.prompt and request.messages:
            raise InvalidArgument("give either prompt or messages, not both", field="messages")
        if request.messages:
            if self.chat is None:
                raise Unavailable("the inference engine is still starting; retry shortly")
            text = self.chat.render([{"role": m.role, "content": m.content} for m in request.messages])
            return {"prompt_token_ids": self.chat.encode(text)}
        if not request.prompt:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        return request.prompt

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        time_remaining: float | None = None,
        *,
        merge_progress: bool = False,
    ) -> AsyncIterator[Step]:
        """Generate for ``request``; ``time_remaining`` is the caller's deadline in seconds, if any.

        With ``merge_progress``, steps carrying only the merge service's progress come first while
        the adapter is merged (the latest event each time the caller takes one: none pile up)."""
        t0 = time.perf_counter()
        _, engine = self.ready()
        prompt = self.prompt_of(request)
        if request.top_logprobs and not request.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs set", field="top_logprobs")
        if request.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {request.top_logprobs}",
                field="top_logprobs",
            )
        params = sampling.to_vllm(
            request.sampling,
            engine.info.max_model_len,
            logprobs=request.top_logprobs if request.logprobs else None,
        )
        request_id = request.request_id or uuid.uuid4().hex
        if merge_progress:
            chosen = None
            async with contextlib.aclosing(self._adapter_with_progress(request, time_remaining)) as items:
                async for item in items:
                    if isinstance(item, merge_pb2.MergeProgress):
                        yield Step("", [], 0, None, request_id=request_id, merge_progress=item)
                    else:
                        chosen = item
            assert chosen is not None
            kind, lease = chosen
        else:
            kind, lease = await self.adapter(request, time_remaining)
        completion = 0
        first = True
        step: Step | None = None
        async with lease or contextlib.nullcontext() as usage:
            if usage is None:
                lora = engine.lora_request(None)
            else:
                lora = engine.lora_request(usage.entry.name, usage.entry.lora_int_id, usage.entry.path)
            try:
                async for out in engine.generate(
                    prompt, params, f"{request_id}-{uuid.uuid4().hex[:8]}", lora
                ):
                    result = out.outputs[0]
                    completion += len(result.token_ids)
                    if first and self.metrics:
                        self.metrics.first_token_seconds.labels(kind=kind).observe(time.perf_counter() - t0)
                    step = Step(
                        text=result.text,
                        token_ids=list(result.token_ids),
                        prompt_tokens=len(out.prompt_token_ids or ()),
                        finish_reason=result.finish_reason if out.finished else None,
                        usage=usage if first else None,
                        completion_tokens=completion,
                        request_id=request_id,
                        logprobs=token_logprobs(result.token_ids, result.logprobs, request.top_logprobs)
                        if request.logprobs
                        else [],
                        stop_reason=result.stop_reason if out.finished else None,
                        prompt_token_ids=list(out.prompt_token_ids or ()) if first else [],
                    )
                    first = False
                    yield step
            except BaseException as e:
                if self.metrics and not isinstance(e, Exception):  # cancelled: vLLM aborted the request
                    self.metrics.aborted.inc()
                raise
        if step is None:  # vLLM ended the request without a single output
            raise Unavailable("the engine finished the request without any output; retry")
        if self.metrics:
            self.metrics.generate_seconds.labels(kind=kind).observe(time.perf_counter() - t0)
            self.metrics.generations.labels(kind=kind, finish_reason=step.finish_reason or "none").inc()
            self.metrics.prompt_tokens.labels(kind=kind).inc(step.prompt_tokens)
            self.metrics.completion_tokens.labels(kind=kind).inc(completion)

    async def _adapter_with_progress(
        self, request: inference_pb2.GenerateRequest, time_remaining: float | None
    ) -> AsyncIterator[merge_pb2.MergeProgress | tuple[str, Lease | None]]:
        """``adapter``'s progress events while it runs (coalesced to the latest), then its result."""
        latest: list[merge_pb2.MergeProgress] = []
        changed = asyncio.Event()

        def on_progress(event: merge_pb2.MergeProgress) -> None:
            latest[:] = [event]
            changed.set()

        task = asyncio.ensure_future(self.adapter(request, time_remaining, on_progress=on_progress))
        try:
            while not task.done():
                waiter = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if changed.is_set() and not task.done():
                    changed.clear()
                    yield latest[0]
        except BaseException:
            task.cancel()
            with contextlib.suppress(BaseException):
                _, lease = await task
                if lease is not None:  # it got its lease just as we were cancelled: give it back
                    await lease.__aexit__(None, None, None)
            raise
        yield task.result()

    async def adapter(
        self,
        request: inference_pb2.GenerateRequest,
        time_remaining: float | None = None,
        on_progress: Callable[[merge_pb2.MergeProgress], None] | None = None,
    ) -> tuple[str, Lease | None]:
        """Which weights the request asked for: (kind, lease on the adapter or None for the base);
        ``on_progress`` gets the merge service's progress while the adapter is merged."""
        registry, _ = self.ready()
        chosen = [
            name
            for name, present in (
                ("adapter_id", bool(request.adapter_id)),
                ("merged_adapters", request.HasField("merged_adapters")),
                ("merge_key", bool(request.merge_key)),
                ("recipe", bool(request.recipe)),
            )
            if present
        ]
        if len(chosen) > 1:
            raise InvalidArgument(
                "set at most one of adapter_id, merged_adapters, merge_key and recipe, "
                f"got {', '.join(chosen)}",
                field=chosen[1],
            )
        if not request.adapter_id:
            for name, present in (
                ("adapter_weight", request.HasField("adapter_weight")),
                ("adapter_revision", bool(request.adapter_revision)),
                ("adapter_source", bool(request.adapter_source)),
            ):
                if present:
                    raise InvalidArgument(f"{name} is set but adapter_id is empty", field=name)
        if not chosen:
            return "base", None
        if request.merge_key:
            return "key", registry.for_key(request.merge_key)
        deadline = self.deadline(time_remaining)
        if request.adapter_id:
            weight = request.adapter_weight if request.HasField("adapter_weight") else None
            spec = single_adapter_spec(
                request.adapter_id, request.adapter_source, request.adapter_revision, weight
            )
            return "adapter", await registry.for_spec(
                spec, deadline=deadline, field_namer=single_adapter_field, on_progress=on_progress
            )
        if request.recipe:
            recipe = self.recipes.get(request.recipe)
            return "recipe", await registry.for_spec(recipe.spec, deadline=deadline, on_progress=on_progress)
        return "merged", await registry.for_spec(
            request.merged_adapters, deadline=deadline, on_progress=on_progress
        )

    def deadline(self, time_remaining: float | None) -> float:
        """When a fetch for this request must be done (time.monotonic()): the caller's deadline, a
        little early, up to the fetch timeout ceiling; the ceiling for a caller without one."""
        budget = self.fetch_timeout_ceiling_seconds
        if time_remaining is not None:
            budget = min(budget, max(0.0, time_remaining - DEADLINE_MARGIN_S))
        return time.monotonic() + budget


def token_logprobs(token_ids, logprobs, top: int) -> list[TokenLogprob]:
    """vLLM's per-position {token_id: Logprob} dicts -> the chosen token's logprob and the top ``top``."""
    out: list[TokenLogprob] = []
    for token_id, position in zip(token_ids, logprobs or (), strict=False):
        chosen = position[token_id]
        best = sorted(position.items(), key=lambda kv: kv[1].rank or 0)[:top] if top else []
        out.append(
            TokenLogprob(
                token_id=token_id,
                text=chosen.decoded_token or "",
                logprob=float(chosen.logprob),
                top=tuple(TopToken(tid, lp.decoded_token or "", float(lp.logprob)) for tid, lp in best),
            )
        )
    return out
