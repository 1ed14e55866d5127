"""The chunk receiver: header checks before any byte is written, contiguous data, size and sha256."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import pytest

from inference_service.receiver import AdapterLimits, AdapterWriter, receive
from loramerge.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from loramerge.v1 import merge_pb2 as M

LIMITS = AdapterLimits(base_model="base/model", max_rank=16, max_bytes=1000)
DATA = bytes(range(256)) * 3


def header(**kw) -> M.MergeHeader:
    config = {"r": 8, "lora_alpha": 16, "peft_type": "LORA", "base_model_name_or_path": "base/model"}
    config.update(kw.pop("config", {}))
    fields = {
        "merge_key": "k1",
        "adapter_config_json": json.dumps(config),
        "total_bytes": len(DATA),
        "sha256": hashlib.sha256(DATA).hexdigest(),
    }
    fields.update(kw)
    return M.MergeHeader(**fields)


def stream(head: M.MergeHeader, data: bytes = DATA, step: int = 100, trailer: bool = True):
    async def chunks():
        yield M.MergeChunk(progress=M.MergeProgress(stage="merge", done=1, total=2))
        yield M.MergeChunk(header=head)
        for off in range(0, len(data), step):
            yield M.MergeChunk(data=M.DataChunk(offset=off, data=data[off : off + step]))
        if trailer:
            yield M.MergeChunk(
                trailer=M.MergeTrailer(total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            )

    return chunks()


def test_a_good_stream_becomes_a_peft_folder(tmp_path: Path):
    writer = AdapterWriter(tmp_path / "x", LIMITS)
    got = asyncio.run(receive(stream(header()), writer))
    assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() == DATA
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["r"] == 8
    assert got.bytes == len(DATA) and got.header.merge_key == "k1"


@pytest.mark.parametrize(
    ("head", "error", "words"),
    [
        (header(base_model="other/model"), FailedPrecondition, "'other/model' differs from the served model"),
        (header(config={"base_model_name_or_path": "other"}), FailedPrecondition, "differs"),
        (header(rank=32), FailedPrecondition, "rank 32 exceeds the engine's max_lora_rank 16"),
        (header(config={"r": 8, "rank_pattern": {"q_proj": 64}}), FailedPrecondition, "rank 64"),
        (header(total_bytes=5000), ResourceExhausted, "5000 bytes exceeds the limit of 1000"),
        (header(adapter_config_json="{nope"), InvalidArgument, "not JSON"),
        (header(config={"use_dora": True}), InvalidArgument, "DoRA"),
        (header(config={"bias": "all"}), InvalidArgument, "bias"),
        (header(sha256="abc"), InvalidArgument, "64 hex digits"),
        (header(file_name="../evil"), InvalidArgument, "file_name"),
        (header(offset=10), InvalidArgument, "offset must be 0"),
    ],
)
def test_a_bad_header_is_refused_before_anything_is_written(tmp_path: Path, head, error, words):
    with pytest.raises(error, match=re.escape(words)):
        AdapterWriter(tmp_path / "x", LIMITS).start(head)
    assert not (tmp_path / "x").exists()
    writer = AdapterWriter(tmp_path / "y", LIMITS)
    with pytest.raises(error):
        asyncio.run(receive(stream(head), writer))
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    ("chunks_of", "words"),
    [
        (lambda: stream(header(sha256="0" * 64)), "differs from header.sha256"),
        (lambda: stream(header(), data=DATA[:-1]), "received 767 bytes"),
        (lambda: stream(header(total_bytes=len(DATA) - 10)), "runs past header.total_bytes"),
        (lambda: stream(header(), data=DATA[:-1] + b"x", trailer=False), "differs from header.sha256"),
    ],
)
def test_bad_data_is_refused_and_discarded(tmp_path: Path, chunks_of, words):
    writer = AdapterWriter(tmp_path / "x", LIMITS)
    with pytest.raises(InvalidArgument, match=words):
        asyncio.run(receive(chunks_of(), writer))
    writer.discard()
    assert not (tmp_path / "x").exists()


def test_out_of_order_data_is_refused(tmp_path: Path):
    writer = AdapterWriter(tmp_path / "x", LIMITS)
    writer.start(header())
    writer.write(M.DataChunk(offset=0, data=DATA[:10]))
    with pytest.raises(InvalidArgument, match="at byte 20, expected byte 10"):
        writer.write(M.DataChunk(offset=20, data=DATA[20:30]))


def test_a_resumed_stream_continues_where_the_first_broke(tmp_path: Path):
    writer = AdapterWriter(tmp_path / "x", LIMITS)
    writer.start(header())
    writer.write(M.DataChunk(offset=0, data=DATA[:300]))
    with pytest.raises(FailedPrecondition, match="resumed stream is merge 'k2'"):
        writer.start(header(merge_key="k2"))
    with pytest.raises(InvalidArgument, match="starts at byte 200, expected 300"):
        writer.start(header(offset=200))
    writer.start(header(offset=300))
    writer.write(M.DataChunk(offset=300, data=DATA[300:]))
    writer.finish(M.MergeTrailer(total_bytes=len(DATA), sha256=hashlib.sha256(DATA).hexdigest()))
    assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() == DATA
