"""The ISO listener's containment: what one connection's failure may and may not take down."""

from __future__ import annotations

from tests.isoclient import IsoClient, auth
from tests.test_clearing import solo  # noqa: F401


async def test_a_bug_in_one_connection_closes_only_that_connection(server, solo, monkeypatch):
    """An unexpected error in a connection's writer closes that connection; the server and the
    other connections go on (before: the error crashed the whole process)."""
    from authsrv.iso import transport

    card = solo[0]
    healthy = await IsoClient.connect(server.iso_port)
    assert (await healthy.call(auth(card, amount=100, cvc2=card["cvc2"])))["39"] == "00"
    real_send_all = transport.StreamSocket.send_all

    async def broken_send_all(self, data: bytes) -> None:
        raise ValueError("injected writer bug")

    monkeypatch.setattr(transport.StreamSocket, "send_all", broken_send_all)
    victim = await IsoClient.connect(server.iso_port)
    await victim.send(auth(card, amount=100, cvc2=card["cvc2"]))
    assert await victim.stream.receive_some(100) == b""  # closed by the server, no answer
    monkeypatch.setattr(transport.StreamSocket, "send_all", real_send_all)
    assert (await healthy.call(auth(card, amount=100, cvc2=card["cvc2"])))["39"] == "00"
    fresh = await IsoClient.connect(server.iso_port)
    assert (await fresh.call(auth(card, amount=100, cvc2=card["cvc2"])))["39"] == "00"
