"""Request sampling parameters (protobuf, zero meaning "default") -> vLLM SamplingParams.

``validate`` checks every bound vLLM 0.32's SamplingParams enforces on the fields the request can
carry, so a bad value is INVALID_ARGUMENT naming ``sampling.<field>`` and never reaches vLLM:
temperature in [0, 2]; top_p in (0, 1] (0: 1); repetition_penalty > 0 (0: 1); presence and frequency
penalties in [-2, 2]; all finite; 1 <= max_tokens <= max_model_len (0: 16); min_tokens <= max_tokens;
no empty stop string. Ours besides: at most ``MAX_STOP_STRINGS`` stop strings. Any top_k (uint32)
and seed (uint64) is valid: vLLM treats a top_k at or above the vocabulary as no cut, and seeds
a torch generator, which takes every 64-bit value.
"""

from __future__ import annotations

import math

from loramerge.errors import InvalidArgument, shown
from loramerge.v1 import inference_pb2

DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 2.0  # vLLM's bound
MAX_ABS_PENALTY = 2.0  # presence_penalty and frequency_penalty, vLLM's bound


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidArgument(f"sampling.{field} {message}", field=f"sampling.{field}")


def validate(s: inference_pb2.SamplingParams, max_model_len: int) -> None:
    """Reject out-of-range values with a message naming the field and the value."""
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        _check(math.isfinite(value), name, f"must be a finite number, got {value}")
    _check(
        0 <= s.temperature <= MAX_TEMPERATURE,
        "temperature",
        f"must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy), got {s.temperature:g}",
    )
    _check(0 <= s.top_p <= 1, "top_p", f"must be in (0, 1] (0 means 1), got {s.top_p:g}")
    _check(
        s.repetition_penalty >= 0,
        "repetition_penalty",
        f"must be > 0 (0 means 1), got {s.repetition_penalty:g}",
    )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        _check(
            -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY,
            name,
            f"must be in [{-MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}], got {value:g}",
        )
    _check(
        s.max_tokens <= max_model_len,
        "max_tokens",
        f"must be <= the engine's max_model_len {max_model_len}, got {s.max_tokens}",
    )
    max_tokens = s.max_tokens or DEFAULT_MAX_TOKENS
    _check(
        s.min_tokens <= max_tokens, "min_tokens", f"must be <= max_tokens {max_tokens}, got {s.min_tokens}"
    )
    _check(
        len(s.stop) <= MAX_STOP_STRINGS,
        "stop",
        f"may hold at most {MAX_STOP_STRINGS} strings, got {len(s.stop)}",
    )
    _check(all(s.stop), "stop", "must not contain empty strings")


def to_vllm(
    s: inference_pb2.SamplingParams,
    max_model_len: int,
    *,
    streaming: bool = True,
    logprobs: int | None = None,
):
    """vLLM SamplingParams; outputs come as deltas (each RequestOutput holds only the new tokens).
    ``logprobs``: return each generated token's log-probability and that many alternatives."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    validate(s, max_model_len)
    try:
        return SamplingParams(
            max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=s.temperature,
            top_p=s.top_p or 1.0,
            top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None,
            stop=list(s.stop) or None,
            repetition_penalty=s.repetition_penalty or 1.0,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY,
        )
    except VLLMValidationError as e:  # a bound of another vLLM version that validate does not know
        name = e.parameter if e.parameter in inference_pb2.SamplingParams.DESCRIPTOR.fields_by_name else ""
        field = f"sampling.{name}" if name else "sampling"
        raise InvalidArgument(
            f"{field} refused by vLLM: {shown(str(e), 300, quote=False)}", field=field
        ) from e
