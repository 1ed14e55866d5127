"""Merge streams received without copying payloads (clients/loramerge/stream.py: parse_chunk, merge_method),
checked against protobuf's own parser, on real loopback gRPC channels and through both receivers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import grpc
import grpc.aio
from hypothesis import given
from hypothesis import strategies as st

from inference_service.merge_client import MergeClient, keep_freed_heap
from inference_service.receiver import AdapterLimits, AdapterWriter, receive
from inference_service.settings import MergeClientSettings
from loramerge.stream import DataView, encode_data_chunk, merge_method, parse_chunk
from loramerge.v1 import merge_pb2 as M
from loramerge.v1 import merge_pb2_grpc
from loramerge_client.receiver import MergeReceiver

DATA = bytes(range(256)) * 50
SHA = hashlib.sha256(DATA).hexdigest()
CONFIG = json.dumps({"r": 4, "peft_type": "LORA", "base_model_name_or_path": "base"})


@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=3000))
def test_a_protobuf_data_chunk_parses_to_a_view_of_the_same_bytes(offset: int, payload: bytes) -> None:
    raw = M.MergeChunk(data=M.DataChunk(offset=offset, data=payload)).SerializeToString()
    got = parse_chunk(raw)
    assert isinstance(got, DataView)
    assert (got.offset, bytes(got.data)) == (offset, payload)
    assert got.data.obj is raw  # a view into the received message: no copy


def test_other_messages_and_other_layouts_go_to_protobuf() -> None:
    header = M.MergeChunk(header=M.MergeHeader(merge_key="k", total_bytes=3))
    assert parse_chunk(header.SerializeToString()) == header
    # Valid protobuf that the fast path does not recognise: data before offset, an unknown field,
    # the data field twice (the last one wins). Protobuf must parse them, with the same meaning.
    inner_swapped = b"\x12\x03abc" + b"\x08\x07"
    inner_unknown = b"\x08\x07\x12\x03abc" + b"\x28\x01"
    inner_twice = b"\x08\x07\x12\x02zz\x12\x03abc"
    for inner in (inner_swapped, inner_unknown, inner_twice):
        raw = b"\x1a" + bytes([len(inner)]) + inner
        got = parse_chunk(raw)
        assert isinstance(got, M.MergeChunk)
        assert (got.data.offset, got.data.data) == (7, b"abc")


class Streamer(merge_pb2_grpc.MergeServiceServicer):
    """header, DATA in 1000-byte protobuf-encoded chunks from resume_offset, trailer."""

    async def Merge(self, request, context):
        offset = request.resume_offset
        yield M.MergeChunk(
            header=M.MergeHeader(
                merge_key="k", adapter_config_json=CONFIG, total_bytes=len(DATA), sha256=SHA, rank=4,
                base_model="base", offset=offset,
            )
        )  # fmt: skip
        for start in range(offset, len(DATA), 1000):
            yield M.MergeChunk(data=M.DataChunk(offset=start, data=DATA[start : start + 1000]))
        yield M.MergeChunk(trailer=M.MergeTrailer(total_bytes=len(DATA), sha256=SHA))


async def _serve() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    merge_pb2_grpc.add_MergeServiceServicer_to_server(Streamer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_merge_method_on_an_asyncio_channel_feeds_the_inference_writer(tmp_path: Path) -> None:
    async def run() -> tuple[list[type], bytes]:
        server, address = await _serve()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                kinds: list[type] = []

                async def watched():
                    async for item in merge_method(channel)(M.MergeRequest(), timeout=10):
                        kinds.append(type(item))
                        yield item

                writer = AdapterWriter(tmp_path / "a", AdapterLimits("base", 16, 1 << 20))
                got = await receive(watched(), writer)
                assert got.bytes == len(DATA)
                return kinds, (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
        finally:
            await server.stop(0)

    kinds, written = asyncio.run(run())
    assert written == DATA
    assert kinds.count(DataView) == 13 and kinds.count(M.MergeChunk) == 2


def test_merge_method_on_a_sync_channel_feeds_the_client_receiver_across_a_resume() -> None:
    async def run() -> bytes:
        server, address = await _serve()
        try:

            def fetch() -> bytes:
                with grpc.insecure_channel(address) as channel:
                    call = merge_method(channel)
                    receiver = MergeReceiver()
                    first = call(receiver.request(M.MergeSpec()), timeout=10)
                    for item in first:  # break off after 3 data chunks, as a dropped connection would
                        receiver.feed(item)
                        if receiver.received >= 3000:
                            first.cancel()
                            break
                    request = receiver.request(M.MergeSpec())
                    assert request.resume_offset == 3000 and request.expected_merge_key == "k"
                    receiver.feed_all(call(request, timeout=10))
                    result = receiver.result()
                    assert result.resumed == 1 and result.sha256 == SHA
                    return result.data

            return await asyncio.to_thread(fetch)
        finally:
            await server.stop(0)

    assert asyncio.run(run()) == DATA


def test_client_receiver_takes_views_and_messages_alike() -> None:
    receiver = MergeReceiver()
    receiver.request(M.MergeSpec())
    receiver.feed(M.MergeChunk(header=M.MergeHeader(merge_key="k", total_bytes=len(DATA), sha256=SHA)))
    receiver.feed(parse_chunk(encode_data_chunk(0, memoryview(DATA)[:5000])))
    receiver.feed(M.MergeChunk(data=M.DataChunk(offset=5000, data=DATA[5000:])))
    receiver.feed(M.MergeChunk(trailer=M.MergeTrailer(total_bytes=len(DATA), sha256=SHA)))
    assert receiver.result().data == DATA


def test_the_inference_merge_client_receives_data_as_views(tmp_path: Path, monkeypatch) -> None:
    seen: list[type] = []
    original = AdapterWriter.write

    def write(self: AdapterWriter, chunk) -> None:
        seen.append(type(chunk))
        original(self, chunk)

    monkeypatch.setattr(AdapterWriter, "write", write)

    async def run() -> None:
        server, address = await _serve()
        client = MergeClient(MergeClientSettings(merge_service=address))
        try:
            writer = AdapterWriter(tmp_path / "m", AdapterLimits("base", 16, 1 << 20))
            fetched = await client.fetch(M.MergeSpec(), writer, deadline=time.monotonic() + 10)
            assert fetched.received.bytes == len(DATA)
        finally:
            await client.close()
            await server.stop(0)

    asyncio.run(run())
    assert (tmp_path / "m" / "adapter_model.safetensors").read_bytes() == DATA
    assert seen == [DataView] * 13


def test_kept_heap_serves_the_next_large_messages_without_page_faults() -> None:
    def minor_faults() -> int:
        return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])

    def messages_in_flight() -> None:  # like four received 1 MiB data chunks, written in full
        held = [b"x" * (1 << 20) for _ in range(4)]
        del held

    assert keep_freed_heap()
    messages_in_flight()
    before = minor_faults()
    for _ in range(25):
        messages_in_flight()
    # With glibc's defaults the freed 4 MiB is trimmed each time and 100 MiB fault in again, page by
    # page (about 25,000 faults).
    assert minor_faults() - before < 500
