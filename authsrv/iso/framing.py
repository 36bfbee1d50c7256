"""ISO 8583 message framing: a 2-byte big-endian unsigned length, then that many bytes.

CONTRACT.md section 3 fixes this framing as the default. A frame whose length is zero or above the
configured maximum means the peer does not speak this framing (or has lost sync), so the reader
raises `FramingError` and the caller closes the connection: nothing after it can be trusted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import trio

LENGTH_PREFIX_SIZE = 2
FRAME_SIZE_MAX = 8192  # bytes of payload; an ISO 8583:1987 message with every field is ~4 KiB
FRAME_SIZE_LIMIT = 2**16 - 1  # what a 2-byte length can express
RECEIVE_SIZE = 65536  # bytes asked of the stream per receive_some call


class FramingError(Exception):
    """The byte stream is not (or no longer) a sequence of valid frames: close the connection."""


async def read_frames(
    stream: trio.abc.ReceiveStream, *, frame_size_max: int = FRAME_SIZE_MAX
) -> AsyncIterator[bytes]:
    """Yield each frame's payload as it completes.

    Ends on a clean EOF between frames; raises FramingError on EOF inside a frame, on a zero
    length, and on a length above `frame_size_max` (checked as soon as the prefix arrives, before
    waiting for the body). A caller that may stop early can wrap the generator in
    `contextlib.aclosing` so it is finalized at once rather than by trio's async-generator hooks.
    """
    assert 1 <= frame_size_max <= FRAME_SIZE_LIMIT
    buffer = bytearray()
    # The buffer holds at most one incomplete frame plus one receive: a bound, not a queue.
    buffer_size_max = LENGTH_PREFIX_SIZE + frame_size_max + RECEIVE_SIZE
    while True:
        start = 0
        available = len(buffer)
        while available - start >= LENGTH_PREFIX_SIZE:
            size = (buffer[start] << 8) | buffer[start + 1]
            if size == 0:
                raise FramingError("zero-length frame")
            if size > frame_size_max:
                raise FramingError(f"frame length {size} above maximum {frame_size_max}")
            end = start + LENGTH_PREFIX_SIZE + size
            if end > available:
                break
            yield bytes(buffer[start + LENGTH_PREFIX_SIZE : end])
            start = end
        if start:
            del buffer[:start]  # one move per receive, not one per frame
        assert len(buffer) < LENGTH_PREFIX_SIZE + frame_size_max
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            if buffer:
                raise FramingError(f"end of stream inside a frame ({len(buffer)} bytes pending)")
            return
        buffer += data
        assert len(buffer) <= buffer_size_max


def frame(payload: bytes) -> bytes:
    """Prefix one payload with its 2-byte big-endian length."""
    size = len(payload)
    if not 1 <= size <= FRAME_SIZE_LIMIT:
        raise ValueError(f"payload of {size} bytes cannot be framed (1 to {FRAME_SIZE_LIMIT})")
    return size.to_bytes(LENGTH_PREFIX_SIZE, "big") + payload


def frame_many(payloads: Iterable[bytes]) -> bytes:
    """Frame several payloads into one buffer, for a single send_all (far cheaper than one each)."""
    return b"".join([frame(payload) for payload in payloads])
