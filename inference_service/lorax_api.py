"""LoRAX-compatible REST: ``POST /`` (what lorax-client calls), ``/generate`` and ``/generate_stream``.

Bodies and answers follow LoRAX's router and lorax-client 0.6.3 (see the README). Where LoRAX is
wrong we stay right: a TIES/DARE merge without a density is a 422 naming it, never a silent zero
adapter; the density lorax-client always sends is ignored for linear merges.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from inference_service.dataplane import DataPlane, Step
from inference_service.http_body import read_json
from inference_service.http_errors import HttpError, http_status, lorax_body
from inference_service.http_specs import merge_spec_from_json
from inference_service.http_streams import chain, first_step, progress_event
from loramerge.errors import LoramergeError, shown
from loramerge.v1 import inference_pb2, merge_pb2

DEFAULT_MAX_NEW_TOKENS = 20  # LoRAX's default
_SOURCES = {
    None: merge_pb2.AdapterSource.ADAPTER_SOURCE_UNSPECIFIED,
    "hub": merge_pb2.AdapterSource.HUB,
    "local": merge_pb2.AdapterSource.LOCAL,
    "s3": merge_pb2.AdapterSource.S3,
}
_FINISH = {"length": "length", "abort": "length"}


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: dict | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool = False
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    stop: list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    details: bool = False
    decoder_input_details: bool = False
    best_of: int | None = None


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: Parameters = Parameters()
    stream: bool = False


def lorax_field(field: str | None) -> str | None:
    if not field:
        return None
    if field.startswith("sampling."):
        name = field.removeprefix("sampling.")
        return "parameters." + {"max_tokens": "max_new_tokens", "ignore_eos": "ignore_eos_token"}.get(
            name, name
        )
    if field.startswith(("adapter_", "merged_adapters")):
        return "parameters." + field
    return "inputs" if field == "prompt" else field


def merged_spec(body: dict) -> merge_pb2.MergeSpec:
    """LoRAX's merged_adapters; its always-present density is dropped for linear (meaningless there)."""
    body = {k: v for k, v in body.items() if v is not None}
    if str(body.get("merge_strategy", "linear")).lower() == "linear":
        body.pop("density", None)
    return merge_spec_from_json(body, "parameters.merged_adapters")


def to_request(body: GenerateBody) -> inference_pb2.GenerateRequest:
    p = body.parameters
    req = inference_pb2.GenerateRequest(prompt=body.inputs, logprobs=True)
    if p.adapter_id and p.merged_adapters:
        raise HttpError(
            400, "give parameters.adapter_id or parameters.merged_adapters, not both", "adapter_id"
        )
    if p.best_of not in (None, 1):
        raise HttpError(400, f"parameters.best_of must be 1, got {p.best_of}", "best_of")
    if p.adapter_source not in _SOURCES:
        raise HttpError(
            400,
            f"parameters.adapter_source must be hub, local or s3, got {shown(p.adapter_source)}",
            "adapter_source",
        )
    if p.merged_adapters is not None:
        req.merged_adapters.CopyFrom(merged_spec(p.merged_adapters))
    elif p.adapter_id:
        req.adapter_id = p.adapter_id
        req.adapter_source = _SOURCES[p.adapter_source]
    s = req.sampling
    max_new = DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens
    if max_new < 1:
        raise HttpError(400, f"parameters.max_new_tokens must be at least 1, got {max_new}", "max_new_tokens")
    s.max_tokens = max_new
    # Greedy unless do_sample, as in LoRAX: temperature, top_k and top_p only shape sampling.
    if p.do_sample:
        s.temperature = 1.0 if p.temperature is None else p.temperature
        if p.top_k:
            s.top_k = p.top_k
        if p.top_p is not None:
            s.top_p = p.top_p
    if p.seed is not None:
        if p.seed < 0:
            raise HttpError(400, f"parameters.seed must be >= 0, got {p.seed}", "seed")
        s.seed = p.seed
    if p.stop:
        s.stop.extend(p.stop)
    if p.repetition_penalty is not None:
        s.repetition_penalty = p.repetition_penalty
    s.ignore_eos = p.ignore_eos_token
    return req


def finish_reason(step: Step) -> str:
    if step.finish_reason == "stop":
        return (
            "eos_token" if step.stop_reason is None or isinstance(step.stop_reason, int) else "stop_sequence"
        )
    return _FINISH.get(step.finish_reason or "length", "length")


def lorax_router(plane: DataPlane, max_body_bytes: int) -> APIRouter:
    router = APIRouter()
    limit = max_body_bytes

    def special() -> frozenset[int]:
        return plane.chat.special_ids if plane.chat else frozenset()

    def tokens(step: Step, specials: frozenset[int]) -> list[dict]:
        return [
            {
                "id": lp.token_id,
                "text": lp.text,
                "logprob": lp.logprob,
                "special": lp.token_id in specials,
                "skipped": False,
            }
            for lp in step.logprobs
        ]

    async def parse(request: Request) -> tuple[GenerateBody, inference_pb2.GenerateRequest]:
        raw = await read_json(request, limit)
        try:
            body = GenerateBody.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            raise HttpError(400, f"{loc or 'body'}: {err.get('msg', 'invalid')}", loc or None) from None
        return body, to_request(body)

    async def start(req: inference_pb2.GenerateRequest, stream: bool = False):
        try:
            return await first_step(plane, req, merge_progress=stream)
        except LoramergeError as e:
            raise HttpError(http_status(e), e.message, lorax_field(e.field)) from e

    async def answer(body: GenerateBody, req: inference_pb2.GenerateRequest) -> dict:
        steps, first = await start(req)
        specials = special()
        texts, toks, last = [], [], first
        async for step in chain(first, steps):
            texts.append(step.text)
            toks.extend(tokens(step, specials))
            last = step
        text = "".join(texts)
        out: dict = {"generated_text": body.inputs + text if body.parameters.return_full_text else text}
        if body.parameters.details:
            chat = plane.chat
            prefill = []
            if body.parameters.decoder_input_details:
                prefill = [
                    {
                        "id": t,
                        "text": chat.token_text(t) if chat else "",
                        "logprob": None,
                        "special": t in specials,
                    }
                    for t in first.prompt_token_ids
                ]
            out["details"] = {
                "finish_reason": finish_reason(last),
                "prompt_tokens": last.prompt_tokens,
                "generated_tokens": last.completion_tokens,
                "skipped_tokens": 0,
                "seed": body.parameters.seed,
                "prefill": prefill,
                "tokens": toks,
            }
        return out

    def stream(body: GenerateBody, req: inference_pb2.GenerateRequest, steps, first: Step) -> Response:
        specials = special()

        async def events() -> AsyncIterator[str | ServerSentEvent]:
            texts: list[str] = []
            first_token: Step | None = None
            try:
                async for step in chain(first, steps):
                    if step.merge_progress is not None:
                        yield progress_event(step.merge_progress)
                        continue
                    first_token = first_token or step
                    texts.append(step.text)
                    toks = tokens(step, specials)
                    # The step's text is vLLM's incremental detokenization: put it on its last token,
                    # so the streamed texts add up to generated_text (a lone byte piece does not decode).
                    for i, token in enumerate(toks):
                        token["text"] = step.text if i == len(toks) - 1 else ""
                        event: dict = {"token": token, "generated_text": None, "details": None}
                        if step.finish_reason and i == len(toks) - 1:
                            text = "".join(texts)
                            event["generated_text"] = (
                                body.inputs + text if body.parameters.return_full_text else text
                            )
                            event["details"] = {
                                "finish_reason": finish_reason(step),
                                "prompt_tokens": step.prompt_tokens or first_token.prompt_tokens,
                                "generated_tokens": step.completion_tokens,
                                "seed": body.parameters.seed,
                            }
                        yield json.dumps(event)
            except LoramergeError as e:
                _, err = lorax_body(http_status(e), e.message)
                yield json.dumps(err)

        return EventSourceResponse(events(), ping=None)

    @router.post("/")
    async def root(request: Request) -> Response:
        body, req = await parse(request)
        if body.stream:
            steps, first = await start(req, stream=True)
            return stream(body, req, steps, first)
        return JSONResponse([await answer(body, req)])

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        body, req = await parse(request)
        return JSONResponse(await answer(body, req))

    @router.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        body, req = await parse(request)
        steps, first = await start(req, stream=True)
        return stream(body, req, steps, first)

    return router
