"""Python client for the loramerge services (blocking and asyncio) and the ``loramerge`` command.

    from loramerge_client import InferenceClient, MergedAdapters, SamplingParams, LoramergeError

Failed calls raise ``LoramergeError`` subclasses with ``.code`` (grpc.StatusCode) and
``.violations`` (field, description) from the server's google.rpc.BadRequest details.
"""

from loramerge.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from loramerge_client.aio import AsyncInferenceClient, AsyncMergeClient
from loramerge_client.client import InferenceClient, MergeClient
from loramerge_client.errors import DataLoss, LoramergeError, exit_code_for, from_rpc_error
from loramerge_client.receiver import MergeReceiver, MergeResult
from loramerge_client.retry import NO_RETRY, Deadline, RetryPolicy
from loramerge_client.tls import TlsOptions
from loramerge_client.types import Adapter, MergedAdapters, SamplingParams

__all__ = [
    "NO_RETRY",
    "Adapter",
    "AsyncInferenceClient",
    "AsyncMergeClient",
    "DataLoss",
    "Deadline",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InferenceClient",
    "Internal",
    "InvalidArgument",
    "LoramergeError",
    "MergeClient",
    "MergeReceiver",
    "MergeResult",
    "MergedAdapters",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SamplingParams",
    "TlsOptions",
    "Unauthenticated",
    "Unavailable",
    "exit_code_for",
    "from_rpc_error",
]
