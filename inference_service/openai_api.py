"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Requests are parsed and answers built with vLLM's own OpenAI protocol models, so field names,
defaults and shapes are the ones vLLM users know; generation goes through the shared data plane.
``model`` picks the base (its served name), a recipe or a single adapter id; an inline merge goes
in the ``merged_adapters`` body field (``extra_body`` in the SDK).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from inference_service.dataplane import DataPlane, Step, TokenLogprob
from inference_service.http_body import read_json
from inference_service.http_errors import HttpError, http_status, openai_body
from inference_service.http_specs import merge_spec_from_json
from inference_service.http_streams import chain, first_step, progress_event
from loramerge.errors import LoramergeError, shown
from loramerge.v1 import inference_pb2

_ADAPTER_FIELDS = {
    "adapter_id",
    "adapter_source",
    "adapter_revision",
    "adapter_weight",
    "recipe",
    "merge_key",
}


def openai_param(field: str | None, chat: bool) -> str | None:
    """The OpenAI body field for a data-plane field name."""
    if not field:
        return None
    if field.startswith("sampling."):
        name = field.removeprefix("sampling.")
        return "max_completion_tokens" if chat and name == "max_tokens" else name
    if field in _ADAPTER_FIELDS:
        return "model"
    if field == "top_logprobs" and not chat:
        return "logprobs"
    return field


def _validation_param(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
    return f"{loc or 'body'}: {err.get('msg', 'invalid')}", loc


def parse_body(model_class, raw: object):
    """The request as vLLM's protocol model; its validators' errors become 400s naming the field."""
    from vllm.exceptions import VLLMError

    try:
        return model_class.model_validate(raw)
    except ValidationError as e:
        message, param = _validation_param(e)
        raise HttpError(400, message, param) from None
    except Exception as e:  # vLLM's own model validators raise VLLMValidationError, outside pydantic's
        if not isinstance(e, ValueError | TypeError | VLLMError):
            raise
        raise HttpError(400, shown(str(e), 300, quote=False), getattr(e, "parameter", None)) from None


def choose_adapter(
    plane: DataPlane, req: inference_pb2.GenerateRequest, model: str | None, extra: dict
) -> str:
    """Fill the request's adapter choice from ``model`` and ``merged_adapters``; the model name echoed."""
    _, engine = plane.ready()
    base = engine.info.model_name
    merged = extra.get("merged_adapters")
    if merged is not None:
        if model and model != base:
            raise HttpError(
                400,
                f"with merged_adapters, model must be the base model {shown(base)} or absent, "
                f"got {shown(model)}",
                "model",
            )
        req.merged_adapters.CopyFrom(merge_spec_from_json(merged))
        return model or base
    if not model or model == base:
        return base
    if model in plane.recipes:
        req.recipe = model
        return model
    registry, _ = plane.ready()
    loaded = registry.get(name=model)
    if loaded is not None:
        req.merge_key = loaded.merge_key
    else:
        req.adapter_id = model
    return model


def fill_sampling(req: inference_pb2.GenerateRequest, body, max_tokens: int | None) -> None:
    if body.n not in (None, 1):
        raise HttpError(400, f"n must be 1 (one choice per request), got {body.n}", "n")
    if getattr(body, "use_beam_search", False):
        raise HttpError(400, "use_beam_search is not supported", "use_beam_search")
    s = req.sampling
    if max_tokens is not None:
        if max_tokens < 1:
            raise HttpError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        s.max_tokens = max_tokens
    s.temperature = 1.0 if body.temperature is None else body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    if body.top_k is not None and body.top_k > 0:
        s.top_k = body.top_k
    if body.seed is not None:
        if body.seed < 0:
            raise HttpError(400, f"seed must be >= 0, got {body.seed}", "seed")
        s.seed = body.seed
    stop = body.stop
    if stop:
        s.stop.extend([stop] if isinstance(stop, str) else stop)
    s.presence_penalty = body.presence_penalty or 0.0
    s.frequency_penalty = body.frequency_penalty or 0.0
    if body.repetition_penalty is not None:
        s.repetition_penalty = body.repetition_penalty
    s.min_tokens = body.min_tokens or 0
    s.ignore_eos = bool(body.ignore_eos)


def _usage(prompt: int, completion: int):
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_logprobs(logprobs: list[TokenLogprob], offset: int):
    from vllm.entrypoints.openai.completion.protocol import CompletionLogProbs

    out = CompletionLogProbs()
    for lp in logprobs:
        out.text_offset.append(offset)
        offset += len(lp.text)
        out.tokens.append(lp.text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t.text: t.logprob for t in lp.top})
    return out


def chat_logprobs(logprobs: list[TokenLogprob]):
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionLogProb,
        ChatCompletionLogProbs,
        ChatCompletionLogProbsContent,
    )

    return ChatCompletionLogProbs(
        content=[
            ChatCompletionLogProbsContent(
                token=lp.text,
                logprob=lp.logprob,
                bytes=list(lp.text.encode()),
                top_logprobs=[
                    ChatCompletionLogProb(token=t.text, logprob=t.logprob, bytes=list(t.text.encode()))
                    for t in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


def openai_router(plane: DataPlane, max_body_bytes: int) -> APIRouter:
    router = APIRouter()
    limit = max_body_bytes

    def domain(e: LoramergeError, chat: bool) -> HttpError:
        return HttpError(http_status(e), e.message, openai_param(e.field, chat))

    @router.get("/v1/models")
    async def models() -> Response:
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        registry, engine = plane.ready()
        base = engine.info.model_name
        cards = [
            ModelCard(
                id=base, root=engine.info.model, owned_by="loramerge", max_model_len=engine.info.max_model_len
            )
        ]
        cards += [
            ModelCard(id=r.name, root=base, parent=base, owned_by="loramerge-recipe") for r in plane.recipes
        ]
        cards += [
            ModelCard(id=e.name, root=base, parent=base, owned_by="loramerge-adapter")
            for e in registry.entries()
        ]
        return JSONResponse(ModelList(data=cards).model_dump(exclude_none=True))

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        from vllm.entrypoints.openai.completion.protocol import (
            CompletionRequest,
            CompletionResponse,
            CompletionResponseChoice,
            CompletionResponseStreamChoice,
            CompletionStreamResponse,
        )

        raw = await read_json(request, limit)
        body = parse_body(CompletionRequest, raw)
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise HttpError(
                400, "prompt must be one string (token-id and batched prompts are not supported)", "prompt"
            )
        if body.echo:
            raise HttpError(400, "echo is not supported", "echo")
        if body.suffix:
            raise HttpError(400, "suffix is not supported", "suffix")
        req = inference_pb2.GenerateRequest(prompt=prompt, request_id=uuid.uuid4().hex)
        model = choose_adapter(plane, req, body.model, body.model_extra or {})
        fill_sampling(req, body, body.max_tokens)
        if body.logprobs is not None:
            req.logprobs = True
            req.top_logprobs = body.logprobs
        try:
            steps, first = await first_step(plane, req, merge_progress=bool(body.stream))
        except LoramergeError as e:
            raise domain(e, chat=False) from e
        rid, created = f"cmpl-{req.request_id}", int(time.time())
        if not body.stream:
            text, logprobs, last = await collect(first, steps)
            choice = CompletionResponseChoice(
                index=0,
                text=text,
                logprobs=completion_logprobs(logprobs, 0) if req.logprobs else None,
                finish_reason=last.finish_reason,
                stop_reason=last.stop_reason,
            )
            answer = CompletionResponse(
                id=rid, created=created, model=model, choices=[choice],
                usage=_usage(last.prompt_tokens, last.completion_tokens),
            )  # fmt: skip
            return JSONResponse(answer.model_dump(exclude_none=True))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str | ServerSentEvent]:
            offset, last = 0, first
            try:
                async for step in chain(first, steps):
                    if step.merge_progress is not None:
                        yield progress_event(step.merge_progress)
                        continue
                    chunk = CompletionStreamResponse(
                        id=rid, created=created, model=model,
                        choices=[CompletionResponseStreamChoice(
                            index=0, text=step.text,
                            logprobs=completion_logprobs(step.logprobs, offset) if req.logprobs else None,
                            finish_reason=step.finish_reason, stop_reason=step.stop_reason,
                        )],
                    )  # fmt: skip
                    offset += len(step.text)
                    last = step
                    yield chunk.model_dump_json(exclude_none=True)
                if include_usage:
                    usage = CompletionStreamResponse(
                        id=rid, created=created, model=model, choices=[],
                        usage=_usage(last.prompt_tokens, last.completion_tokens),
                    )  # fmt: skip
                    yield usage.model_dump_json(exclude_none=True)
            except LoramergeError as e:
                yield json.dumps(openai_body(http_status(e), e.message, openai_param(e.field, False)))
            yield "[DONE]"

        return EventSourceResponse(events(), ping=None)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        from vllm.entrypoints.generate.base.protocol import DeltaMessage
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest,
            ChatCompletionResponse,
            ChatCompletionResponseChoice,
            ChatCompletionResponseStreamChoice,
            ChatCompletionStreamResponse,
            ChatMessage,
        )

        raw = await read_json(request, limit)
        body = parse_body(ChatCompletionRequest, raw)
        req = inference_pb2.GenerateRequest(request_id=uuid.uuid4().hex)
        for i, message in enumerate(body.messages):
            req.messages.add(role=str(message.get("role") or ""), content=message_text(message, i))
        model = choose_adapter(plane, req, body.model, body.model_extra or {})
        fill_sampling(req, body, body.max_completion_tokens or body.max_tokens)
        if body.logprobs:
            req.logprobs = True
            req.top_logprobs = body.top_logprobs or 0
        elif body.top_logprobs:
            raise HttpError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        try:
            steps, first = await first_step(plane, req, merge_progress=bool(body.stream))
        except LoramergeError as e:
            raise domain(e, chat=True) from e
        rid, created = f"chatcmpl-{req.request_id}", int(time.time())
        if not body.stream:
            text, logprobs, last = await collect(first, steps)
            choice = ChatCompletionResponseChoice(
                index=0,
                message=ChatMessage(role="assistant", content=text),
                logprobs=chat_logprobs(logprobs) if req.logprobs else None,
                finish_reason=last.finish_reason,
                stop_reason=last.stop_reason,
            )
            answer = ChatCompletionResponse(
                id=rid, created=created, model=model, choices=[choice],
                usage=_usage(last.prompt_tokens, last.completion_tokens),
            )  # fmt: skip
            return JSONResponse(answer.model_dump(exclude_none=True))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta, step: Step | None = None) -> str:
            return ChatCompletionStreamResponse(
                id=rid, created=created, model=model,
                choices=[ChatCompletionResponseStreamChoice(
                    index=0, delta=delta,
                    logprobs=chat_logprobs(step.logprobs) if step is not None and req.logprobs else None,
                    finish_reason=step.finish_reason if step is not None else None,
                    stop_reason=step.stop_reason if step is not None else None,
                )],
            ).model_dump_json(exclude_none=True)  # fmt: skip

        async def events() -> AsyncIterator[str | ServerSentEvent]:
            last = first
            yield chunk(DeltaMessage(role="assistant", content=""))
            try:
                async for step in chain(first, steps):
                    if step.merge_progress is not None:
                        yield progress_event(step.merge_progress)
                        continue
                    last = step
                    yield chunk(DeltaMessage(content=step.text), step)
                if include_usage:
                    yield ChatCompletionStreamResponse(
                        id=rid, created=created, model=model, choices=[],
                        usage=_usage(last.prompt_tokens, last.completion_tokens),
                    ).model_dump_json(exclude_none=True)  # fmt: skip
            except LoramergeError as e:
                yield json.dumps(openai_body(http_status(e), e.message, openai_param(e.field, True)))
            yield "[DONE]"

        return EventSourceResponse(events(), ping=None)

    return router


def message_text(message, index: int) -> str:
    """A chat message's text: a string, or the text parts of a list of content parts."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise HttpError(
                400,
                f"only text content parts are supported, got {shown(part.get('type'))}",
                f"messages[{index}].content",
            )
        texts.append(part.get("text", ""))
    return "".join(texts)


async def collect(first: Step, rest: AsyncIterator[Step]) -> tuple[str, list[TokenLogprob], Step]:
    """A whole generation: its text, its token logprobs and its last step."""
    texts, logprobs, last = [], [], first
    async for step in chain(first, rest):
        texts.append(step.text)
        logprobs.extend(step.logprobs)
        last = step
    return "".join(texts), logprobs, last
