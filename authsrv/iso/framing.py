"""ISO 8583 message framing: a 2-byte big-endian unsigned length, then that many bytes.

docs/contract.md, wire profile fixes this framing as the default. A frame whose length is zero or above the
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


class FrameSplitter:
    """Splits a received byte stream into frame payloads, keeping a partial frame between feeds.

    The buffer holds at most one incomplete frame plus one receive: a bound, not a queue.
    A framing error is kept in `error` (the frames before it are still returned, so their answers
    can go out before the connection is closed); nothing more is accepted after one.
    """

    __slots__ = ("_buffer", "_frame_size_max", "error")

    def __init__(self, frame_size_max: int = FRAME_SIZE_MAX) -> None:
        assert 1 <= frame_size_max <= FRAME_SIZE_LIMIT
        self._buffer = bytearray()
        self._frame_size_max = frame_size_max
        self.error: FramingError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame waiting for the rest."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Append `data`; return the payloads of every frame it completes, in order.

        Sets `error` on a zero length or a length above the maximum (checked as soon as the
        prefix is there, before the body arrives) and returns the good frames before it.
        """
        assert self.error is None, "the stream lost its framing: close it"
        buffer = self._buffer
        assert len(buffer) + len(data) <= LENGTH_PREFIX_SIZE + self._frame_size_max + RECEIVE_SIZE
        buffer += data
        payloads = []
        start, available, size_max = 0, len(buffer), self._frame_size_max
        while available - start >= LENGTH_PREFIX_SIZE:
            size = (buffer[start] << 8) | buffer[start + 1]
            if size == 0 or size > size_max:
                self.error = FramingError("zero-length frame" if size == 0 else
                                          f"frame length {size} above maximum {size_max}")  # fmt: skip
                break
            end = start + LENGTH_PREFIX_SIZE + size
            if end > available:
                break
            payloads.append(bytes(buffer[start + LENGTH_PREFIX_SIZE : end]))
            start = end
        if start:
            del buffer[:start]  # one move per receive, not one per frame
        return payloads


async def read_frames(
    stream: trio.abc.ReceiveStream, *, frame_size_max: int = FRAME_SIZE_MAX
) -> AsyncIterator[bytes]:
    """Yield each frame's payload as it completes.

    Ends on a clean EOF between frames; raises FramingError on EOF inside a frame, on a zero
    length, and on a length above `frame_size_max` (checked as soon as the prefix arrives, before
    waiting for the body). A caller that may stop early can wrap the generator in
    `contextlib.aclosing` so it is finalized at once rather than by trio's async-generator hooks.
    """
    splitter = FrameSplitter(frame_size_max)
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            if splitter.pending:
                raise FramingError(f"end of stream inside a frame ({splitter.pending} bytes pending)")
            return
        for payload in splitter.feed(data):
            yield payload
        if splitter.error is not None:
            raise splitter.error


def frame(payload: bytes) -> bytes:
    """Prefix one payload with its 2-byte big-endian length."""
    size = len(payload)
    if not 1 <= size <= FRAME_SIZE_LIMIT:
        raise ValueError(f"payload of {size} bytes cannot be framed (1 to {FRAME_SIZE_LIMIT})")
    return size.to_bytes(LENGTH_PREFIX_SIZE, "big") + payload


def frame_many(payloads: Iterable[bytes]) -> bytes:
    """Frame several payloads into one buffer, for a single send_all (far cheaper than one each)."""
    return b"".join([frame(payload) for payload in payloads])
