"""Fetch a merged adapter from the merge service: retry while it is unavailable, resume broken streams.

Uses the generated stubs directly, with the client library's retry policy
(loramerge_client.retry: which codes are retried, jittered exponential back-off, never past the
deadline), configured from the service's settings. ``dns:///name:port`` addresses are balanced
round-robin over every address the name resolves to (a headless Kubernetes Service).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_status import rpc_status

from inference_service.receiver import AdapterWriter, Received, receive
from inference_service.request_specs import merged_spec_field
from inference_service.settings import MergeClientSettings
from loramerge.errors import (
    DeadlineExceeded,
    FieldViolation,
    Internal,
    LoramergeError,
    Unavailable,
    error_class_for,
    violations_from_status,
)
from loramerge.stream import DataView, merge_method
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from loramerge_client.retry import Deadline, Retrier
from loramerge_common.auth import bearer_metadata, load_token
from loramerge_common.tls import channel_credentials

log = logging.getLogger(__name__)

ProgressFn = Callable[[merge_pb2.MergeProgress], None]


# glibc mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_heap(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Let glibc reuse freed memory for the next received message instead of returning it to the OS.

    gRPC Python allocates each received message (about 1 MiB per data chunk) afresh. With glibc's
    defaults those blocks are mmapped, or trimmed off the heap when a few are freed together, and the
    pages of the next ones fault in again: 60 to 200 page faults per MB received, about a third of the
    receiving CPU time (benchmarks/bench_stream.py). Blocks under ``mmap_threshold`` now come from the
    heap, and up to ``trim_threshold`` of free heap is kept: values within the range glibc's own
    dynamic thresholds move in (up to 32 MiB and 64 MiB), fixed so that they stay there.
    Process-wide; False where there is no mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


@dataclass(frozen=True)
class Fetched:
    received: Received
    attempts: int
    resumed: int  # how many times a broken stream was resumed


async def tap_progress(
    chunks: AsyncIterator[merge_pb2.MergeChunk | DataView], on_progress: ProgressFn
) -> AsyncIterator[merge_pb2.MergeChunk | DataView]:
    """``chunks`` unchanged, with each progress item also given to ``on_progress``."""
    async for chunk in chunks:
        if not isinstance(chunk, DataView) and chunk.WhichOneof("item") == "progress":
            on_progress(chunk.progress)
        yield chunk


class MergeClient:
    def __init__(
        self, settings: MergeClientSettings, *, on_retry: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.target = settings.merge_service
        self.retry_policy = settings.merge_retry_policy()
        keep_freed_heap()
        options = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.enable_retries", 0),  # we retry (and resume) ourselves
            # Reconnect quickly to a restarted merge pod (gRPC's default back-off grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if settings.merge_tls_ca is not None or settings.merge_tls_cert is not None:
            creds = channel_credentials(
                settings.merge_tls_ca, settings.merge_tls_cert, settings.merge_tls_key
            )
            self._channel = grpc.aio.secure_channel(self.target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        token = load_token(None, settings.merge_auth_token_file)
        self._metadata = bearer_metadata(token) if token else ()
        self._stub = merge_pb2_grpc.MergeServiceStub(self._channel)
        # Merge yielding data chunks as views into the received messages (written without a copy).
        self._merge = merge_method(self._channel)
        self._on_retry = on_retry or (lambda reason: None)

    async def close(self) -> None:
        await self._channel.close()

    async def fetch(
        self,
        spec: merge_pb2.MergeSpec,
        writer: AdapterWriter,
        *,
        deadline: float,
        field_namer: Callable[[str], str] = merged_spec_field,
        on_progress: ProgressFn | None = None,
    ) -> Fetched:
        """Stream ``spec``'s merged adapter into ``writer`` before ``deadline`` (time.monotonic()).

        While the merge service is unavailable (a code the retry policy retries), retries with
        jittered exponential back-off until the deadline or the policy's attempts run out, then
        raises Unavailable. A stream that breaks after the header resumes from the last byte
        received. Errors the merge service reports come back as the matching domain error.
        ``on_progress`` gets the merge service's progress items while it builds.
        """
        retrier = Retrier(self.retry_policy, Deadline(deadline - time.monotonic()))
        attempts = resumed = 0
        last_error = ""
        t0 = time.perf_counter()
        header_ms = 0.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            attempts += 1
            retrier.attempts = attempts
            request = merge_pb2.MergeRequest(spec=spec)
            if writer.header is not None:
                request.resume_offset = writer.received
                request.expected_merge_key = writer.header.merge_key
            rpc = self._merge(request, timeout=remaining, metadata=self._metadata)
            call = rpc if on_progress is None else tap_progress(rpc, on_progress)
            try:
                received = await receive(call, writer)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(
                        f"merge service {self.target} did not deliver the adapter before the deadline "
                        f"({attempts} attempt(s), {time.perf_counter() - t0:.1f} s)"
                    ) from e
                delay = retrier.retry_delay(e.code())
                if delay is None and e.code() not in self.retry_policy.retry_codes:
                    raise await self._domain_error(e, rpc, field_namer) from e
                last_error = f"{e.code().name}: {e.details()}"
                if writer.header is not None:
                    resumed += 1
                    if not header_ms and writer.header_at is not None:
                        # When the header came, not when the stream broke (that is transfer time).
                        header_ms = max(0.0, (writer.header_at - t0) * 1e3)
                if delay is None:  # attempts used up, or no time left for another wait
                    break
                self._on_retry(e.code().name)
                log.warning(
                    "merge service call failed; retrying",
                    extra={
                        "target": self.target,
                        "error": last_error,
                        "retry_in": delay,
                        "received": writer.received,
                    },
                )
                await asyncio.sleep(delay)
                continue
            finally:
                rpc.cancel()
            if header_ms:  # resumed: report the first attempt's time to header, the rest as transfer
                total = (time.perf_counter() - t0) * 1e3
                received = Received(
                    header=received.header,
                    config=received.config,
                    directory=received.directory,
                    bytes=received.bytes,
                    header_ms=header_ms,
                    transfer_ms=total - header_ms,
                )
            return Fetched(received=received, attempts=attempts, resumed=resumed)
        raise Unavailable(
            f"merge service {self.target} unavailable: {attempts} attempt(s) over "
            f"{time.perf_counter() - t0:.1f} s, last error {last_error or 'none (deadline reached first)'}",
            field=field_namer("spec"),
        )

    async def plan(
        self,
        spec: merge_pb2.MergeSpec,
        *,
        deadline: float,
        field_namer: Callable[[str], str] = merged_spec_field,
    ) -> str:
        """The merge key ``spec`` resolves to now, from the merge service's Plan (sources resolved,
        nothing built). One attempt, no retry: a caller that cannot get an answer keeps what it has."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"no time left to ask merge service {self.target} for a plan")
        call = self._stub.Plan(merge_pb2.MergeRequest(spec=spec), timeout=remaining, metadata=self._metadata)
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(
                    f"merge service {self.target} did not answer Plan within {remaining:.1f} s"
                ) from e
            if e.code() in self.retry_policy.retry_codes:
                raise Unavailable(
                    f"merge service {self.target} unavailable: {e.code().name}: {e.details()}",
                    field=field_namer("spec"),
                ) from e
            raise await self._domain_error(e, call, field_namer) from e
        if not response.merge_key:
            raise Internal(f"merge service {self.target} answered Plan without a merge_key")
        return response.merge_key

    async def _domain_error(
        self, e: grpc.aio.AioRpcError, call: grpc.aio.Call, field_namer: Callable[[str], str]
    ) -> LoramergeError:
        try:
            status = await rpc_status.aio.from_call(call)
        except Exception:
            status = None
        violations = [
            FieldViolation(field_namer(v.field), v.description) for v in violations_from_status(status)
        ]
        message = e.details() or e.code().name
        for original in violations_from_status(status):
            message = message.replace(original.field, field_namer(original.field))
        cls = error_class_for(e.code())
        return cls(
            f"merge service: {message}",
            field=violations[0].field if violations else field_namer("spec"),
            violations=violations or None,
        )
