"""The codec's layout-cached fast path (authsrv/iso/codec.py) against pyiso8583 on near-valid messages.

tests/test_iso_request.py checks random docs and random bytes; random bytes rarely get past the
bitmaps, so here valid messages (text and binary fields, one or two bitmaps) are damaged one byte
at a time, where the fast path's own checks (length prefixes, ASCII around binary fields, sizes)
have to catch what pyiso8583 refuses.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authsrv.iso import codec
from authsrv.iso.codec import IsoDecodeError, IsoEncodeError

PIN_BLOCK = bytes([0x9F, 0x00, 0x80, 0xFF, 0x41, 0x7F, 0x30, 0xC3])  # high bytes, a digit, a letter

MESSAGES = [
    {"t": "0100", "2": "5350010000000001", "3": "000000", "4": "000000001000", "11": "000001",
     "35": "5350010000000001=2812101", "43": "SHOP                      BERLIN      DE", "48": "9203123",
     "49": "978", "52": PIN_BLOCK},
    {"t": "0400", "2": "5350010000000001", "11": "000002", "55": b"\x00\xff" * 20, "90": "0" * 42,
     "95": "0" * 42, "128": bytes(range(200, 208))},
    {"t": "0800", "7": "1122101010", "11": "000003", "70": "301"},
]


def _outcome(function, raw: bytes) -> object:
    try:
        return function(raw)
    except IsoDecodeError as error:
        return (error.field, error.reason)


@given(st.sampled_from(MESSAGES), st.data())
@settings(max_examples=400, deadline=None)
def test_one_damaged_byte_gets_pyiso8583s_verdict(message: dict, data: st.DataObject) -> None:
    raw = codec.encode(message)
    position = data.draw(st.integers(0, len(raw) - 1))
    byte = data.draw(st.sampled_from([0x00, 0x20, 0x2F, 0x30, 0x39, 0x3A, 0x7F, 0x80, 0xB2, 0xFF]))
    damaged = raw[:position] + bytes([byte]) + raw[position + 1 :]
    assert _outcome(codec.decode, damaged) == _outcome(codec._decode_slow, damaged)


@given(st.sampled_from(MESSAGES), st.integers(0, 60))
@settings(max_examples=200, deadline=None)
def test_truncated_or_extended_messages_get_pyiso8583s_verdict(message: dict, cut: int) -> None:
    raw = codec.encode(message)
    for candidate in (raw[: max(0, len(raw) - cut)], raw + b"7" * cut):
        assert _outcome(codec.decode, candidate) == _outcome(codec._decode_slow, candidate)


def test_fast_path_round_trips_text_and_binary_messages() -> None:
    for message in MESSAGES:
        raw = codec._encode_fast(message)
        assert raw == codec._encode_slow(message)
        assert codec._decode_fast(raw) == codec._decode_slow(raw) == message
        assert all(type(value) is str for key, value in codec._decode_fast(raw).items()
                   if key not in codec.BINARY_FIELDS)


def test_non_ascii_text_after_a_binary_field_is_refused() -> None:
    raw = codec.encode(MESSAGES[0])  # field 52 (binary) is the last field
    damaged = raw.replace(b"978", b"9\xb28")  # '²' is a digit to str.isdigit, not to pyiso8583
    with pytest.raises(codec._Irregular):
        codec._decode_fast(damaged)
    with pytest.raises(IsoDecodeError):
        codec.decode(damaged)


def test_text_encode_refuses_what_the_slow_path_refuses() -> None:
    for doc in ({"t": "0110", "39": "0\u00e9"}, {"t": "0110", "39": "000"}, {"t": "0110", "39": b"00"},
                {"t": "0110", "2": "1" * 20}, {"t": "0110", "999": "x"}):
        with pytest.raises(IsoEncodeError):
            codec.encode(doc)


def test_layout_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "LAYOUTS_CACHED_MAX", 3)
    monkeypatch.setattr(codec, "_decode_layouts", {})
    monkeypatch.setattr(codec, "_encode_layouts", {})
    for number in range(2, 30):
        doc = {"t": "0100", "11": "000001", str(number): codec.SPEC[str(number)]["max_len"] * "1"}
        if codec.SPEC[str(number)]["data_enc"] == "b":
            continue
        raw = codec.encode(doc)
        assert codec.decode(raw) == doc
    assert len(codec._decode_layouts) == 3 and len(codec._encode_layouts) == 3
