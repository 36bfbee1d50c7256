"""A small ISO 8583 network-side client for tests, written from the contract (section 3) with
pyiso8583 directly, so the server's own wire code is checked by an independent peer."""

from __future__ import annotations

import copy
import itertools
import struct

import iso8583
import iso8583.specs
import trio

SPEC = copy.deepcopy(iso8583.specs.default)
TRANSMISSION = "1121221500"  # field 7, MMDDhhmmss
_stan = itertools.count(1)
_rrn = itertools.count(1)


def next_ids() -> tuple[str, str]:
    return f"{next(_stan) % 1_000_000:06d}", f"T{next(_rrn):011d}"


def encode(doc: dict) -> bytes:
    raw, _ = iso8583.encode(dict(doc), SPEC)
    return struct.pack(">H", len(raw)) + bytes(raw)


def decode(payload: bytes) -> dict:
    doc, _ = iso8583.decode(payload, SPEC)
    return doc


def auth(card: dict, *, mti: str = "0100", processing: str = "000000", amount: int = 1000, currency: str = "978",
         cvc2: str | None = None, pin_block: bytes | None = None, expiry: str | None = "card", mcc: str = "5411",
         billing: tuple[int, str] | None = None, acquirer: str = "123456", stan: str | None = None,
         rrn: str | None = None, pan: str | None = None, **extra) -> dict:
    new_stan, new_rrn = next_ids()
    doc = {
        "t": mti,
        "2": pan or card["pan"],
        "3": processing,
        "4": f"{amount:012d}",
        "7": TRANSMISSION,
        "11": stan or new_stan,
        "12": "221500",
        "13": "1121",
        "18": mcc,
        "22": "051",
        "32": acquirer,
        "37": rrn or new_rrn,
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "43": "FROGSHOP LUBLIN                       PL",
        "49": currency,
    }
    if expiry == "card":
        doc["14"] = card["expiry"]
    elif expiry is not None:
        doc["14"] = expiry
    if cvc2 is not None:
        doc["48"] = f"92{len(cvc2):02d}{cvc2}"
    if pin_block is not None:
        doc["52"] = pin_block.hex().upper()  # pyiso8583 takes binary fields as hex text
    if billing is not None:
        doc["6"] = f"{billing[0]:012d}"
        doc["51"] = billing[1]
    doc.update(extra)
    return doc


def reversal_of(original: dict, *, mti: str = "0400", remaining: int | None = None) -> dict:
    doc = {k: v for k, v in original.items() if k in ("2", "3", "4", "7", "32", "37", "41", "42", "49", "6", "51")}
    stan, _ = next_ids()
    doc.update({"t": mti, "11": stan})
    doc["90"] = original["t"] + original["11"] + original["7"] + original["32"].rjust(11, "0") + "0" * 11
    if remaining is not None:
        doc["95"] = f"{remaining:012d}" + "0" * 30
    return doc


class IsoClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> "IsoClient":
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, doc: dict) -> None:
        await self.stream.send_all(encode(doc))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self, timeout: float = 10) -> dict:
        with trio.fail_after(timeout):
            while True:
                if len(self._buffer) >= 2:
                    (length,) = struct.unpack(">H", self._buffer[:2])
                    if len(self._buffer) >= 2 + length:
                        payload = bytes(self._buffer[2:2 + length])
                        del self._buffer[:2 + length]
                        return decode(payload)
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError("server closed the connection")
                self._buffer += chunk

    async def call(self, doc: dict, timeout: float = 10) -> dict:
        await self.send(doc)
        response = await self.receive(timeout)
        assert (response.get("11"), response.get("37")) == (doc.get("11"), doc.get("37")), response
        return response

    async def aclose(self) -> None:
        await self.stream.aclose()
