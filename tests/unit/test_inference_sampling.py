"""Sampling parameter validation, with vLLM's own SamplingParams as the oracle.

For every field a request carries, values at and around vLLM's bounds are given both to
``sampling.validate`` and straight to ``vllm.SamplingParams``: the service must accept exactly what
vLLM accepts (so nothing vLLM refuses reaches it and turns into INTERNAL), and refuse the rest with
INVALID_ARGUMENT naming ``sampling.<field>`` and the value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference_service import sampling
from loramerge.errors import InvalidArgument
from loramerge.v1 import inference_pb2

I = inference_pb2  # noqa: E741
MAX_MODEL_LEN = 512


def f32_after(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(math.inf)))


def f32_before(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(-math.inf)))


EDGES = [0.0, -0.0, 1e-45, 0.5, 1.0, f32_after(1.0), 2.0, f32_after(2.0), 2.5, 1e6, -1e-45, -1.0]
EDGES += [f32_before(-2.0), -2.0, 3.4e38, -3.4e38, math.nan, math.inf, -math.inf]
CASES = [
    *(("temperature", v) for v in EDGES),
    *(("top_p", v) for v in EDGES),
    *(("repetition_penalty", v) for v in EDGES),
    *(("presence_penalty", v) for v in EDGES),
    *(("frequency_penalty", v) for v in EDGES),
    *(("top_k", v) for v in [0, 1, 40, 2**31, 2**32 - 1]),
    *(("seed", v) for v in [0, 1, 2**63, 2**64 - 1]),
    *(("max_tokens", v) for v in [0, 1, 16, MAX_MODEL_LEN]),
    *(("min_tokens", v) for v in [0, 1, 16, 17, 2**32 - 1]),
]


def vllm_accepts(s: I.SamplingParams) -> bool:
    """Whether vLLM takes the values the service maps the request to (0 meaning its default)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    try:
        SamplingParams(
            max_tokens=s.max_tokens or sampling.DEFAULT_MAX_TOKENS,
            temperature=s.temperature,
            top_p=s.top_p or 1.0,
            top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None,
            stop=list(s.stop) or None,
            repetition_penalty=s.repetition_penalty or 1.0,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_tokens=s.min_tokens,
        )
    except VLLMValidationError:
        return False
    return True


@pytest.mark.parametrize(("name", "value"), CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_accepts_exactly_what_vllm_accepts(name: str, value: float) -> None:
    s = I.SamplingParams()
    setattr(s, name, value)
    stored = getattr(s, name)  # as the message holds it (float32)
    try:
        sampling.validate(s, MAX_MODEL_LEN)
    except InvalidArgument as e:
        assert not vllm_accepts(s), f"refused what vLLM takes: {e.message}"
        assert e.field == f"sampling.{name}"
        assert e.message.startswith(f"sampling.{name} ")
        assert f"got {stored:g}" in e.message or f"got {stored}" in e.message
        return
    assert vllm_accepts(s), f"sampling.{name}={stored!r} passed validation but vLLM refuses it"
    sampling.to_vllm(s, MAX_MODEL_LEN)


def test_temperature_above_two_names_the_field_and_value() -> None:
    with pytest.raises(InvalidArgument) as info:
        sampling.to_vllm(I.SamplingParams(temperature=2.5), MAX_MODEL_LEN)
    assert info.value.field == "sampling.temperature"
    assert info.value.message == "sampling.temperature must be in [0, 2] (0 is greedy), got 2.5"


def test_bounds_of_our_own() -> None:
    """Past what vLLM checks on its own: max_tokens within the engine, stop string count and emptiness."""
    cases = [
        (I.SamplingParams(max_tokens=MAX_MODEL_LEN + 1), "sampling.max_tokens"),
        (I.SamplingParams(min_tokens=17), "sampling.min_tokens"),  # above the default max_tokens 16
        (I.SamplingParams(stop=["x"] * (sampling.MAX_STOP_STRINGS + 1)), "sampling.stop"),
        (I.SamplingParams(stop=["x", ""]), "sampling.stop"),
    ]
    for s, field in cases:
        with pytest.raises(InvalidArgument) as info:
            sampling.validate(s, MAX_MODEL_LEN)
        assert info.value.field == field
    sampling.validate(I.SamplingParams(stop=["x"] * sampling.MAX_STOP_STRINGS), MAX_MODEL_LEN)
