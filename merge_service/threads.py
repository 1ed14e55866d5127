"""Intra-op thread counts. torch's count is per calling thread (OpenMP's is a thread-local setting), so a
worker thread can run its products on one thread while its siblings do the same on the other cores."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``n`` intra-op threads in this thread (None: leave as is)."""
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
