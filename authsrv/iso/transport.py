"""Non-blocking socket calls that go through trio only when the kernel says they would block.

trio's `SocketStream.receive_some` / `send_all` pass through the scheduler after every call that
succeeds at once (a cancel-shielded checkpoint, on top of a cancellation check): on a 2-core VM
that is two scheduler round trips per message at low load, more than the codec costs. Here a
receive or send that the kernel can satisfy now is one system call; only "would block" waits, with
`trio.lowlevel.wait_readable` (a real, cancellable checkpoint) or trio's own `send_all`. Callers
must checkpoint themselves when they loop on data that is always ready (see IsoServer._read_all).
"""

from __future__ import annotations

import os

import trio


class StreamSocket:
    """One connection's socket: `receive_nowait`, `wait_readable`, `send_nowait`, `send_all`. Errors
    as trio's."""

    __slots__ = ("_stream", "fd")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.fd = stream.socket.fileno()  # the key of the ISO server's epoll set

    def receive_nowait(self, size: int) -> bytes | None:
        """The bytes the kernel has (b"" at end of stream), or None if there are none yet."""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None
        except OSError as error:  # reset by the peer, or closed under us
            raise trio.BrokenResourceError(f"receive failed: {error}") from error

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    def send_nowait(self, data: bytes | memoryview) -> int:
        """The bytes the kernel takes now (0 if it would block: a full socket buffer)."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as error:
            raise trio.BrokenResourceError(f"send failed: {error}") from error

    async def send_all(self, data: bytes | memoryview) -> None:
        """Write now what the kernel takes; the rest (a full socket buffer) through trio."""
        sent = self.send_nowait(data)
        if sent < len(data):
            await self._stream.send_all(memoryview(data)[sent:])
