"""Hostile ISO 8583 input for tests: valid seed messages, mutations of them, random bytes, and a
reader of the metrics exposition that counts series per family.

Used by the hypothesis properties (tests/test_iso_fuzz.py), the cardinality test against a server
(tests/test_metrics_cardinality.py) and the live mutation fuzz of the slow suite. Everything is
driven by a `random.Random` the caller seeds, so a failing run can be repeated.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tests.isoclient import SPEC, TRANSMISSION, auth, reversal_of

import iso8583

FRAME_PAYLOAD_MAX = 8192  # the server's default [iso] frame_size_max
CONTROL = bytes(range(32)) + b"\x7f"


def payload(doc: dict) -> bytes:
    """A doc encoded by pyiso8583 (the independent peer), without the length prefix."""
    raw, _ = iso8583.encode(dict(doc), SPEC)
    return bytes(raw)


def network(stan: str, code: str = "301", transmission: str = TRANSMISSION) -> dict:
    return {"t": "0800", "7": transmission, "11": stan, "70": code}


def seed_payloads(cards: list[dict]) -> list[bytes]:
    """One valid message of each class (and a few variants) for the first cards given."""
    docs = []
    for card in cards[:4]:
        purchase = auth(card, amount=7, cvc2=card.get("cvc2"))
        docs += [
            purchase,
            auth(card, mti="0200", amount=5),
            auth(card, mti="0120", amount=3),
            auth(card, mti="0220", amount=2),
            auth(card, mti="0101", amount=4, billing=(5, "840")),
            reversal_of(purchase),
            reversal_of(purchase, mti="0420", remaining=3),
            auth(card, amount=1, processing="300000"),  # balance inquiry
            auth(card, amount=6, expiry=None, **{"35": f"{card['pan']}={card['expiry']}101"}),
            auth(card, mti="0200", amount=8, processing="010000", pin_block=bytes(range(8))),  # a wrong PIN
        ]
    docs += [network("000001"), network("000002", "001"), network("000003", "002")]
    return [payload(doc) for doc in docs]


def fake_cards(count: int = 2) -> list[dict]:
    """Card dicts shaped like cards.jsonl rows, for tests that need no server."""
    from authsrv.cardsec import generate_pan

    return [{"pan": generate_pan("535522", 1000 + n), "expiry": "2812", "cvc2": "123"} for n in range(count)]


def _random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _mti(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # digits: known and unknown classes
        return "".join(rng.choice("0123456789") for _ in range(4)).encode()
    if kind == 1:  # printable ASCII
        return bytes(rng.randrange(32, 127) for _ in range(4))
    if kind == 2:  # control characters: the harshest label values
        return bytes(rng.choice(CONTROL) for _ in range(4))
    if kind == 3:  # one character of a valid MTI changed
        base = bytearray(rng.choice([b"0100", b"0200", b"0400", b"0800", b"0120", b"0420"]))
        base[rng.randrange(4)] = rng.randrange(256)
        return bytes(base)
    return _random_bytes(rng, 4)


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    """One to three random mutations of `data` (byte flips, MTI, bitmaps, lengths, cuts, splices)."""
    raw = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(10)
        if kind == 0 and raw:  # overwrite a few bytes
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif kind == 1:  # a new MTI
            raw[0:4] = _mti(rng)
        elif kind == 2 and len(raw) > 4:  # flip bitmap bits (primary and secondary)
            for _ in range(rng.randint(1, 4)):
                index = 4 + rng.randrange(min(16, len(raw) - 4))
                raw[index] ^= 1 << rng.randrange(8)
        elif kind == 3 and raw:  # truncate
            del raw[rng.randrange(1, len(raw) + 1):]
        elif kind == 4:  # append
            raw += _random_bytes(rng, rng.randint(1, 64))
        elif kind == 5:  # insert
            at = rng.randrange(len(raw) + 1)
            raw[at:at] = _random_bytes(rng, rng.randint(1, 16))
        elif kind == 6 and len(raw) > 2:  # delete a slice
            at = rng.randrange(len(raw) - 1)
            del raw[at:at + rng.randint(1, 16)]
        elif kind == 7 and raw:  # digits where lengths and numbers are: LL/LLL prefixes, amounts
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.choice(b"0123456789")
        elif kind == 8:  # splice two messages
            other = rng.choice(seeds)
            raw = raw[: rng.randrange(len(raw) + 1)] + bytearray(other[rng.randrange(len(other) + 1):])
        elif kind == 9 and raw:  # control characters into text
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.choice(CONTROL)
    if not raw:
        raw = bytearray(_mti(rng))
    return bytes(raw[:FRAME_PAYLOAD_MAX])


def random_payload(rng: random.Random) -> bytes:
    """Random bytes, half of them behind an MTI and a bitmap so decoding gets further."""
    if rng.random() < 0.5:
        return _random_bytes(rng, rng.randint(1, 300))
    head = _mti(rng) + _random_bytes(rng, 8 if rng.random() < 0.5 else 16)
    return head + _random_bytes(rng, rng.randint(0, 200))


def answer(payload: bytes) -> object:
    """What the switch's edge does with one frame (authsrv/hotpath/pipeline.py, Switch._handle): the
    parsed request, or the documented error it answers with (IsoDecodeError: 30 when field 11 and
    37 came through, else nothing; UnsupportedMti: 12; FormatError: 30). The response is built and
    encoded as the switch does. Raises anything undocumented: that is a bug."""
    from authsrv.hotpath.pipeline import _response_mti
    from authsrv.iso import codec
    from authsrv.iso.codec import IsoDecodeError
    from authsrv.iso.request import AuthRequest, FormatError, NetworkRequest, UnsupportedMti
    from authsrv.iso.request import parse_request, response_doc

    try:
        doc = codec.decode(payload)
    except IsoDecodeError as error:
        partial = error.partial
        if "11" in partial and "37" in partial and str(partial.get("t", "")).isdigit():
            codec.encode(response_doc(partial, _response_mti(partial["t"]), "30"))
        return error
    mti = doc.get("t", "")
    response = _response_mti(mti) if len(mti) == 4 and mti.isdigit() else "0810"
    try:
        request = parse_request(doc)
    except FormatError as error:
        code = "12" if isinstance(error, UnsupportedMti) else "30"
        assert (error.field == 0) == isinstance(error, UnsupportedMti)
        assert codec.decode(codec.encode(response_doc(doc, response, code)))["39"] == code
        return error
    assert isinstance(request, (AuthRequest, NetworkRequest))
    assert codec.decode(codec.encode(response_doc(request.raw, request.response_mti, "00")))["39"] == "00"
    return request


def hostile_payloads(rng: random.Random, seeds: list[bytes], count: int) -> Iterator[bytes]:
    """`count` payloads of 1 to FRAME_PAYLOAD_MAX bytes: 80% mutated seeds, 20% random bytes."""
    for _ in range(count):
        if rng.random() < 0.8:
            yield mutate(rng.choice(seeds), rng, seeds)
        else:
            yield random_payload(rng)


# -- the metrics exposition -------------------------------------------------------------------------


def series_by_family(exposition: str, prefix: str = "authsrv_") -> dict[str, set[tuple]]:
    """Family name -> its distinct label sets (histogram `le` left out), for families under `prefix`."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, set[tuple]] = {}
    for family in text_string_to_metric_families(exposition):
        if not family.name.startswith(prefix):
            continue
        found = families.setdefault(family.name, set())
        for sample in family.samples:
            found.add(tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("le", "quantile"))))
    return families


def control_characters_in_labels(families: dict[str, set[tuple]]) -> list[tuple[str, str, str]]:
    """(family, label, value) for every label value holding a control character."""
    found = []
    for name, label_sets in families.items():
        for labels in label_sets:
            for key, value in labels:
                if any(ord(char) < 32 or ord(char) == 127 for char in value):
                    found.append((name, key, value))
    return found
