"""2-byte length framing: splits at every byte boundary, bad lengths, EOF, real loopback TCP."""

from __future__ import annotations

import contextlib
import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from authsrv.iso import codec
from authsrv.iso.framing import (
    FRAME_SIZE_MAX,
    FramingError,
    frame,
    frame_many,
    read_frames,
)

CHUNKS_MAX = 100_000  # bound on the scripted stream below


class ScriptedStream(trio.abc.ReceiveStream):
    """Returns the given chunks one per receive_some call, then EOF (b"")."""

    def __init__(self, chunks: list[bytes]) -> None:
        assert len(chunks) <= CHUNKS_MAX
        self._chunks = list(chunks)
        self.calls = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        if not self._chunks:
            return b""
        chunk = self._chunks.pop(0)
        assert max_bytes is None or len(chunk) <= max_bytes
        return chunk

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def collect(chunks: list[bytes], **kwargs: int) -> list[bytes]:
    return [payload async for payload in read_frames(ScriptedStream(chunks), **kwargs)]


PAYLOADS = [b"0800first", b"x", b"second payload " * 20, bytes(range(256))]
WIRE = frame_many(PAYLOADS)


def test_frame_prefix_is_big_endian_length() -> None:
    assert frame(b"abc") == b"\x00\x03abc"
    assert frame(b"a" * 300) == b"\x01\x2c" + b"a" * 300
    assert frame(b"a" * 65535)[:2] == b"\xff\xff"
    assert frame_many([b"a", b"bc"]) == b"\x00\x01a\x00\x02bc"


@pytest.mark.parametrize("size", [0, 65536])
def test_frame_rejects_unframeable_payloads(size: int) -> None:
    with pytest.raises(ValueError):
        frame(b"a" * size)


async def test_whole_buffer_in_one_receive() -> None:
    assert await collect([WIRE]) == PAYLOADS


async def test_split_at_every_byte_boundary() -> None:
    for cut in range(1, len(WIRE)):
        assert await collect([WIRE[:cut], WIRE[cut:]]) == PAYLOADS, cut


async def test_split_at_every_pair_of_boundaries_around_the_first_frames() -> None:
    head = len(frame(PAYLOADS[0])) + len(frame(PAYLOADS[1])) + 3
    for first in range(1, head):
        for second in range(first + 1, head + 1):
            chunks = [WIRE[:first], WIRE[first:second], WIRE[second:]]
            assert await collect(chunks) == PAYLOADS, (first, second)


async def test_one_byte_at_a_time() -> None:
    assert await collect([WIRE[i : i + 1] for i in range(len(WIRE))]) == PAYLOADS


@given(
    st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=20),
    st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=50),
)
@settings(max_examples=100, deadline=None)
def test_any_chunking_gives_the_same_frames(payloads: list[bytes], sizes: list[int]) -> None:
    wire = frame_many(payloads)
    chunks, position = [], 0
    for index in range(len(wire)):  # bounded: at most one chunk per byte
        if position >= len(wire):
            break
        size = sizes[index % len(sizes)]
        chunks.append(wire[position : position + size])
        position += size
    assert trio.run(collect, chunks) == payloads


async def test_zero_length_frame_is_a_framing_error() -> None:
    with pytest.raises(FramingError, match="zero-length"):
        await collect([frame(b"ok") + b"\x00\x00" + frame(b"never")])


async def test_zero_length_after_good_frames_yields_them_first() -> None:
    got = []
    with pytest.raises(FramingError):
        stream = ScriptedStream([frame(b"one") + frame(b"two") + b"\x00\x00"])
        async for payload in read_frames(stream):
            got.append(payload)
    assert got == [b"one", b"two"]


async def test_over_long_frame_fails_on_the_prefix_alone() -> None:
    stream = ScriptedStream([(FRAME_SIZE_MAX + 1).to_bytes(2, "big")])
    with pytest.raises(FramingError, match="above maximum"):
        async for _ in read_frames(stream):
            pass
    assert stream.calls == 1  # did not wait for the body


async def test_frame_size_max_is_configurable() -> None:
    assert await collect([frame(b"a" * 100)], frame_size_max=100) == [b"a" * 100]
    with pytest.raises(FramingError):
        await collect([frame(b"a" * 101)], frame_size_max=100)
    biggest = frame(b"a" * 65535)
    assert await collect([biggest[:60000], biggest[60000:]], frame_size_max=65535) == [b"a" * 65535]


async def test_clean_eof_between_frames_ends_iteration() -> None:
    assert await collect([]) == []
    assert await collect([frame(b"only")]) == [b"only"]


@pytest.mark.parametrize("cut", [1, 2, 5])
async def test_eof_inside_a_frame_is_a_framing_error(cut: int) -> None:
    with pytest.raises(FramingError, match="end of stream"):
        await collect([frame(b"whole") + frame(b"partial")[:cut]])


async def test_memory_stream_pair() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    got: list[bytes] = []

    async def reader() -> None:
        async for payload in read_frames(receive):
            got.append(payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for index in range(len(WIRE)):
            await send.send_all(WIRE[index : index + 1])
        await send.aclose()
    assert got == PAYLOADS


async def test_real_loopback_tcp_round_trip_with_codec() -> None:
    """A framed 0800 echo server on 127.0.0.1, driven by a client splitting its writes randomly."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    messages = [
        {"t": "0800", "7": "0612153045", "11": f"{stan:06d}", "70": "301"} for stan in range(1, 201)
    ]

    async def serve(stream: trio.SocketStream) -> None:
        try:
            async for payload in read_frames(stream):
                doc = codec.decode(payload)
                reply = {"t": "0810", "7": doc["7"], "11": doc["11"], "70": doc["70"], "39": "00"}
                await stream.send_all(frame(codec.encode(reply)))
        finally:
            await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, listeners)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            wire = frame_many(codec.encode(message) for message in messages)
            rng = random.Random(8583)
            position = 0
            while position < len(wire):  # bounded by len(wire): each step sends >= 1 byte
                size = rng.randint(1, 97)
                await client.send_all(wire[position : position + size])
                position += size
            replies = []
            async with contextlib.aclosing(read_frames(client)) as frames:
                async for payload in frames:
                    replies.append(codec.decode(payload))
                    if len(replies) == len(messages):
                        break
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert [reply["11"] for reply in replies] == [message["11"] for message in messages]
    assert all(reply["t"] == "0810" and reply["39"] == "00" for reply in replies)
