"""The merged adapter's safetensors bytes: what the official reader decodes, in a fixed layout, filled in
place and hashed as they fill."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load

from merge_service.safetensors_file import SafetensorsFile, TensorEntry, safetensors_bytes


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


@pytest.mark.parametrize("hash_thread", [False, True])
def test_a_file_filled_in_any_order_has_the_bytes_and_sha256_of_the_joined_tensors(hash_thread: bool) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}.lora_A.weight": torch.randn(50, 40 + i, generator=g) for i in range(6)}
    tensors["h.lora_B.weight"] = torch.randn(7, 3, generator=g).to(torch.bfloat16)
    entries = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsFile(entries, {"k": "v"}, hash_thread=hash_thread) as f:
        first = ["t3.lora_A.weight", "t0.lora_A.weight", "h.lora_B.weight"]
        for name in first + sorted(set(tensors) - set(first)):  # the hash must wait for the gaps
            f.slot(name).copy_(tensors[name])
            f.filled(name)
        data, digest = f.finish()
    assert isinstance(data, bytes) and len(data) == f.nbytes
    assert data == safetensors_bytes(tensors, {"k": "v"})
    assert digest == hashlib.sha256(data).hexdigest()
    assert all(torch.equal(load(data)[name], t) for name, t in tensors.items())


def test_finish_refuses_a_file_with_a_tensor_never_filled() -> None:
    entries = [TensorEntry("a", torch.float32, (2, 3)), TensorEntry("b", torch.float16, (4,))]
    with SafetensorsFile(entries, None, hash_thread=True) as f:
        f.slot("b").fill_(1.0)
        f.filled("b")
        with pytest.raises(ValueError, match="1 tensors were never filled, the first 'a'"):
            f.finish()
    assert f._thread is None  # leaving the block stopped the hashing thread


def test_an_error_while_filling_stops_the_hashing_thread() -> None:
    entries = [TensorEntry(f"t{i}", torch.float32, (100,)) for i in range(3)]
    f = SafetensorsFile(entries, None, hash_thread=True)
    with pytest.raises(RuntimeError, match="merge failed"), f:
        f.slot("t0").zero_()
        f.filled("t0")
        raise RuntimeError("merge failed")
    assert f._thread is None


def test_a_slot_keeps_the_file_memory_alive_after_the_file_is_dropped() -> None:
    import gc

    f = SafetensorsFile([TensorEntry("a", torch.float32, (1 << 20,))], None, hash_thread=False)
    slot = f.slot("a")
    slot.fill_(2.0)
    del f  # e.g. a failed build whose traceback still holds the slot
    gc.collect()
    assert float(slot.sum()) == 2.0 * (1 << 20)
