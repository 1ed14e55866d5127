"""Deadlines that span retries, and exponential backoff on UNAVAILABLE (and server-side CANCELLED).

UNAVAILABLE is retried: it means the request never reached a working server (connection refused,
server restarting or draining, overloaded proxy), so sending it again cannot do anything twice.
So is a CANCELLED this client did not ask for (its calls are cancelled only by their deadline, which
reads DEADLINE_EXCEEDED): our servers never send it, but grpc core answers it for a call that
races a server's shutdown (it drops calls that arrive after grpc's stop began, before any handler
ran). ABORTED too: a build found an input rewritten since its plan and did nothing; the retry plans
again. Every loramerge call is idempotent (plans, key-addressed merges, content-addressed pushes).
DEADLINE_EXCEEDED, INTERNAL and the rest may have done work and are returned to the caller.

The default budget (10 attempts, backoff up to 2 s: about 11 s in all, within the call's deadline)
spans a drain and a replacement process starting on the same port.
A retry never outlives the call's deadline: each attempt gets the time that is left.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from loramerge_client.errors import from_rpc_error, make_error


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff before attempt k+1 (k >= 1) is ``min(max_backoff, initial_backoff * multiplier**(k-1))``,
    scaled by a random factor in ``[1 - jitter, 1 + jitter]``."""

    max_attempts: int = 10
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retry_codes: frozenset[grpc.StatusCode] = field(
        default=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
    )

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1.0
        return base * spread


NO_RETRY = RetryPolicy(max_attempts=1)


class Deadline:
    """An absolute point in time (monotonic) shared by every attempt of one call; None = no limit."""

    def __init__(self, timeout: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = None if timeout is None else clock() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        return None if self._end is None else max(0.0, self._end - self._clock())

    def expired(self) -> bool:
        return self._end is not None and self._clock() >= self._end


class Retrier:
    """Decides, after each failed attempt, whether to wait and go again or to raise.

    Usage::

        retrier = Retrier(policy, deadline)
        while True:
            try:
                return stub.Method(request, timeout=retrier.timeout())
            except grpc.RpcError as err:
                retrier.after_failure(err)  # sleeps, or raises the LoramergeError
    """

    def __init__(
        self,
        policy: RetryPolicy,
        deadline: Deadline,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.attempts = 0
        self._sleep = sleep
        self._rng = rng

    def timeout(self) -> float | None:
        """The timeout for the next attempt; raises DeadlineExceeded when none is left."""
        self.attempts += 1
        left = self.deadline.remaining()
        if left is not None and left <= 0:
            raise make_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call was sent")
        return left

    def retry_delay(self, code: grpc.StatusCode | None) -> float | None:
        """Seconds to wait before the next attempt after one that failed with ``code``; None when
        the policy says stop: the code is not retried, the attempts are used up, or the wait would
        outlive the deadline. (For callers that raise their own errors, e.g. the inference service.)"""
        if code not in self.policy.retry_codes or self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff(self.attempts, self._rng)
        left = self.deadline.remaining()
        if left is not None and delay >= left:
            return None
        return delay

    def _delay(self, err: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt, or raise the error when there is none."""
        delay = self.retry_delay(err.code() if hasattr(err, "code") else None)
        if delay is None:
            raise from_rpc_error(err) from err
        return delay

    def after_failure(self, err: grpc.RpcError) -> None:
        self._sleep(self._delay(err))

    async def after_failure_async(self, err: grpc.RpcError) -> None:
        await asyncio.sleep(self._delay(err))
