"""The ISO listener's containment: what one connection's failure may and may not take down."""

from __future__ import annotations

from tests.isoclient import IsoClient, auth
from tests.test_clearing import solo  # noqa: F401


async def test_a_bug_in_one_connection_closes_only_that_connection(server, solo, monkeypatch):
    """An unexpected error while writing a connection's answers closes that connection; the server
    and the other connections go on (before: the error crashed the whole process)."""
    from authsrv.iso import transport

    card = solo[0]
    healthy = await IsoClient.connect(server.iso_port)
    assert (await healthy.call(auth(card, amount=100, cvc2=card["cvc2"])))["39"] == "00"
    real_send_nowait = transport.StreamSocket.send_nowait

    def broken_send_nowait(self, data: bytes) -> int:
        raise ValueError("injected writer bug")

    monkeypatch.setattr(transport.StreamSocket, "send_nowait", broken_send_nowait)
    victim = await IsoClient.connect(server.iso_port)
    await victim.send(auth(card, amount=100, cvc2=card["cvc2"]))
    assert await victim.stream.receive_some(100) == b""  # closed by the server, no answer
    monkeypatch.setattr(transport.StreamSocket, "send_nowait", real_send_nowait)
    assert (await healthy.call(auth(card, amount=100, cvc2=card["cvc2"])))["39"] == "00"
    fresh = await IsoClient.connect(server.iso_port)
    assert (await fresh.call(auth(card, amount=100, cvc2=card["cvc2"])))["39"] == "00"


async def test_a_peer_that_does_not_read_its_answers_is_slowed_by_tcp(data_dir):
    """A sender that never reads its answers: once `in_flight_per_connection_max` answers wait, the
    server stops reading that socket (it leaves the reader's epoll set), so the sender's writes
    stall in TCP instead of growing the server's memory, while other connections are served. When
    the sender reads again, the server takes it back and answers every request it sent."""
    import socket
    import time

    import trio

    from authsrv.iso.framing import RECEIVE_SIZE, FrameSplitter
    from tests.conftest import start_in_process
    from tests.isoclient import decode, encode

    echo = encode({"t": "0800", "7": "1121221500", "11": "000001", "70": "301"})
    chunk = echo * 1000
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, iso__in_flight_per_connection_max=4)
        flood = socket.socket()
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers back up at once
        flood.connect(("127.0.0.1", server.iso_port))
        flood.setblocking(False)
        written, stalled_since, bound = 0, None, 64 * 2**20
        while written < bound:  # until the server stops reading: nothing taken for 0.5 s
            try:
                written += flood.send(chunk[written % len(chunk):])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                await trio.sleep(0.01)
        assert written < bound, "the server kept reading a peer that takes no answers"
        # the documented bound: the in-flight limit, plus the frames of the one receive that crossed it
        assert server.switch._metrics.in_flight._value.get() <= 4 + RECEIVE_SIZE // len(echo)

        other = await IsoClient.connect(server.iso_port)  # the others are served meanwhile
        answer = await other.call({"t": "0800", "7": "1121221500", "11": "000002", "70": "301"})
        assert answer["39"] == "00"

        answers: list[bytes] = []
        splitter = FrameSplitter()
        partial = written % len(echo)
        if partial:  # finish the frame cut by the stall, so that every request is whole
            rest = echo[partial:]
            with trio.fail_after(60):
                while rest:
                    try:
                        rest = rest[flood.send(rest):]
                    except BlockingIOError:
                        await drain_some(flood, answers, splitter)
        expected = -(-written // len(echo))
        with trio.fail_after(60):
            while len(answers) < expected:
                await drain_some(flood, answers, splitter)
        flood.close()
        assert len(answers) == expected
        assert all(decode(payload)["39"] == "00" for payload in answers[:: max(1, expected // 50)])
        server.stop.set()


async def drain_some(sock, answers: list, splitter) -> None:
    """Read what the socket has (waiting for it through trio) and split it into frames."""
    import trio

    await trio.lowlevel.wait_readable(sock)
    data = sock.recv(1 << 20)
    assert data, "the server closed the connection"
    answers += splitter.feed(data)
    assert splitter.error is None
