"""The merged adapter's safetensors bytes: what the official reader decodes, in a fixed layout."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load

from merge_service.output import safetensors_bytes, safetensors_bytes_and_sha256


def test_safetensors_bytes_decode_with_the_official_reader_in_a_fixed_layout() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "z.lora_B.weight": torch.randn(6, 3, generator=g).to(torch.bfloat16),
        "a.lora_A.weight": torch.randn(3, 5, generator=g),
        "m.lora_A.weight": torch.randn(4, 2, generator=g).to(torch.float16).T,  # not contiguous
    }
    data = safetensors_bytes(tensors, {"loramerge.merge_key": "k"})
    assert isinstance(data, bytes)
    got = load(data)
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    assert size % 8 == 0 and list(header) == ["__metadata__", *sorted(tensors)]
    assert header["__metadata__"] == {"format": "pt", "loramerge.merge_key": "k"}
    assert data == safetensors_bytes(dict(reversed(tensors.items())), {"loramerge.merge_key": "k"})


@pytest.mark.parametrize("threads", [1, 2])
def test_bytes_and_sha256_agree_with_hashlib(threads: int) -> None:
    tensors = {f"t{i}.lora_A.weight": torch.randn(50, 40) for i in range(5)}
    data, digest = safetensors_bytes_and_sha256(tensors, {"k": "v"}, threads=threads)
    assert data == safetensors_bytes(tensors, {"k": "v"})
    assert digest == hashlib.sha256(data).hexdigest()
