"""A generation's steps as an HTTP stream: started before the response (so a fault before the first
step is a plain HTTP error), merge progress as SSE comment lines, the first step chained back on."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import ServerSentEvent

from inference_service.dataplane import DataPlane, Step
from loramerge.v1 import inference_pb2, merge_pb2


async def first_step(
    plane: DataPlane, req: inference_pb2.GenerateRequest, *, merge_progress: bool = False
) -> tuple[AsyncIterator[Step], Step]:
    """Start generating and wait for the first step, so every fault before it is a plain HTTP error.

    ``merge_progress`` (streams): the first step may be the merge service's progress while the
    adapter is merged (``progress_event``); a fault after that comes in the stream."""
    steps = plane.generate(req, merge_progress=merge_progress)
    try:
        return steps, await anext(steps)
    except BaseException:
        await steps.aclose()
        raise


def progress_event(progress: merge_pb2.MergeProgress) -> ServerSentEvent:
    """Merge progress as an SSE comment line (``: merge progress: merge 12/224``): every SSE parser
    (the openai SDK, lorax-client, browsers' EventSource) skips comments, so streams stay valid."""
    return ServerSentEvent(comment=f"merge progress: {progress.stage} {progress.done}/{progress.total}")


async def chain(first: Step, rest: AsyncIterator[Step]) -> AsyncIterator[Step]:
    yield first
    async for step in rest:
        yield step
