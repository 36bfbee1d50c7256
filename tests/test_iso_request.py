"""Codec (wire profile of docs/contract.md, wire profile) and the typed request edge."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import iso8583
import iso8583.specs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authsrv.cardsec import encrypt_pin_block, generate_pan
from authsrv.iso import codec
from authsrv.iso.codec import IsoDecodeError, IsoEncodeError
from authsrv.iso.fields import build_field48, build_field90, build_field95
from authsrv.iso.request import (
    MANDATORY_FIELDS,
    MESSAGE_CLASSES,
    AuthRequest,
    FormatError,
    NetworkCode,
    NetworkRequest,
    UnsupportedMti,
    parse_mti,
    parse_request,
    response_doc,
    response_mti,
)

PAN = "5355220000001234"
ZPK = bytes.fromhex("0123456789ABCDEF" "FEDCBA9876543210")


def authorization(**changes: str | bytes | None) -> dict[str, str | bytes]:
    """A typical 0100 with 19 fields; `changes` sets fields, None removes them."""
    doc: dict[str, str | bytes] = {
        "t": "0100",
        "2": PAN,
        "3": "000000",
        "4": "000000001234",
        "7": "0612153045",
        "11": "123456",
        "12": "153045",
        "13": "0612",
        "14": "2812",
        "18": "5411",
        "22": "010",
        "32": "12345678",
        "37": "ABC123456789",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "43": "ACME STORE               BERLIN       DE",
        "48": build_field48({"92": "123"}),
        "49": "978",
        "52": encrypt_pin_block("1234", PAN, ZPK),
    }
    for key, value in changes.items():
        key = key.removeprefix("f")
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def reversal(mti: str = "0400", **changes: str | bytes | None) -> dict[str, str | bytes]:
    doc = authorization(t=mti, f11="123457", f52=None, f48=None)
    doc["90"] = build_field90("0100", "123456", "0612153045", "12345678")
    doc["95"] = build_field95(1000)
    for key, value in changes.items():
        key = key.removeprefix("f")
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


NETWORK = {"t": "0800", "7": "0612153045", "11": "000001", "70": "301"}


# --------------------------------------------------------------------------------------------
# Codec


def test_spec_is_the_default_profile_but_a_private_copy() -> None:
    assert codec.SPEC == iso8583.specs.default
    assert codec.SPEC is not iso8583.specs.default
    assert codec.SPEC["52"] is not iso8583.specs.default["52"]


def test_wire_bytes_of_a_network_message() -> None:
    # ASCII MTI, binary primary bitmap (bits 1, 7, 11), binary secondary bitmap (bit 70), ASCII
    # fields.
    raw = codec.encode(NETWORK)
    expected = (
        b"0800"
        + bytes.fromhex("8220000000000000")
        + bytes.fromhex("0400000000000000")
        + b"0612153045"
        + b"000001"
        + b"301"
    )
    assert raw == expected
    assert codec.decode(raw) == NETWORK


def test_wire_bytes_of_llvar_and_pin_block() -> None:
    block = encrypt_pin_block("1234", PAN, ZPK)
    raw = codec.encode({"t": "0100", "2": PAN, "52": block})
    # bit 2 -> byte 0 0x40; bit 52 -> byte 6 0x10
    assert raw == b"0100" + bytes.fromhex("4000000000001000") + b"16" + PAN.encode() + block
    # Field 52 travels as exactly the 8 encrypted bytes: no length prefix, no hex.
    assert raw.endswith(block) and len(raw) == 4 + 8 + 2 + 16 + 8


def test_round_trip_typical_authorization() -> None:
    doc = authorization()
    raw = codec.encode(doc)
    decoded = codec.decode(raw)
    assert decoded == doc
    assert isinstance(decoded["52"], bytes)
    assert "p" not in decoded and "1" not in decoded
    assert codec.encode(decoded) == raw


def test_decode_accepts_bytearray_and_gives_bytes() -> None:
    raw = codec.encode(authorization())
    for variant in (bytearray(raw), memoryview(raw)):
        doc = codec.decode(variant)  # type: ignore[arg-type]
        assert doc == authorization() and type(doc["52"]) is bytes


def test_round_trip_reversal_with_secondary_bitmap() -> None:
    doc = reversal()
    raw = codec.encode(doc)
    assert codec.decode(raw) == doc
    # Same bytes as pyiso8583 itself produces with the hex-text convention.
    assert raw == bytes(iso8583.encode(copy.deepcopy(doc), iso8583.specs.default)[0])


def test_encode_does_not_mutate_its_input() -> None:
    doc = authorization()
    before = copy.deepcopy(doc)
    codec.encode(doc)
    assert doc == before


def test_encode_accepts_pyiso8583_style_hex_and_ignores_stale_bitmaps() -> None:
    doc = authorization()
    hex_doc = dict(doc, **{"52": doc["52"].hex().upper(), "p": "FF" * 8})  # type: ignore
    assert codec.encode(hex_doc) == codec.encode(doc)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"t": "0100", "4": "123"}, "4"),  # fixed length 12
        ({"t": "0100", "2": "1" * 20}, "2"),  # LLVAR max 19
        ({"t": "0100", "999": "x"}, "999"),
        ({"t": "0100", "3": b"\x00" * 6}, "3"),  # bytes for a text field
        ({"t": "0100", "43": "é" * 40}, "43"),  # not ASCII
        ({"2": PAN}, "t"),
    ],
)
def test_encode_errors_name_the_field_and_carry_no_values(doc: dict, field: str) -> None:
    with pytest.raises(IsoEncodeError) as raised:
        codec.encode(doc)
    assert raised.value.field == field
    assert PAN not in str(raised.value) and raised.value.__cause__ is None


def test_decode_error_for_every_truncation_never_leaks_the_pan() -> None:
    raw = codec.encode(authorization(f35=f"{PAN}=2812101123", f14=None))
    for cut in range(len(raw)):
        with pytest.raises(IsoDecodeError) as raised:
            codec.decode(raw[:cut])
        error = raised.value
        assert PAN not in str(error) and PAN not in repr(error)
        assert error.__cause__ is None and error.__suppress_context__
        assert error.field in codec.SPEC
    with pytest.raises(IsoDecodeError, match="Extra data"):
        codec.decode(raw + b"0")


def test_decode_error_keeps_fields_decoded_before_the_failure() -> None:
    raw = codec.encode(authorization())
    cut = raw.index(b"ABC123456789") + 12 + 3  # through field 37 and 3 bytes of field 41
    with pytest.raises(IsoDecodeError) as raised:
        codec.decode(raw[:cut])
    partial = raised.value.partial
    assert raised.value.field == "41"
    assert partial["t"] == "0100" and partial["11"] == "123456" and partial["37"] == "ABC123456789"
    assert "41" not in partial and "p" not in partial


def test_decode_rejects_non_ascii_and_bad_lengths() -> None:
    raw = bytearray(codec.encode(NETWORK))
    raw[-1] = 0xFF
    with pytest.raises(IsoDecodeError):
        codec.decode(bytes(raw))
    good = codec.encode({"t": "0100", "2": PAN})
    bad_ll = good.replace(b"16" + PAN.encode(), b"1X" + PAN.encode())
    with pytest.raises(IsoDecodeError) as raised:
        codec.decode(bad_ll)
    assert raised.value.field == "2"
    too_long = good.replace(b"16" + PAN.encode(), b"20" + PAN.encode() + b"1234")
    with pytest.raises(IsoDecodeError):
        codec.decode(too_long)


def test_decode_rejects_fields_beyond_128() -> None:
    # Bit 65 set in the secondary bitmap announces a tertiary bitmap the profile does not have.
    raw = b"0800" + bytes.fromhex("8000000000000000") * 3
    with pytest.raises(IsoDecodeError):
        codec.decode(raw + b"X" * 10)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_decode_raises_only_iso_decode_error(raw: bytes) -> None:
    try:
        doc = codec.decode(raw)
    except IsoDecodeError:
        return
    assert codec.decode(codec.encode(doc)) == doc


@given(st.binary(min_size=12, max_size=200))
@settings(max_examples=300)
def test_decode_of_mutated_messages_raises_only_iso_decode_error(noise: bytes) -> None:
    raw = bytearray(codec.encode(authorization()))
    for index, byte in enumerate(noise[:12]):
        raw[(byte * 7 + index * 13) % len(raw)] = noise[-1 - index]
    try:
        codec.decode(bytes(raw))
    except IsoDecodeError:
        pass


# The fast path must agree with pyiso8583 on everything it accepts, and hand everything else over.
_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


def _field_value(key: str) -> st.SearchStrategy[str | bytes]:
    spec = codec.SPEC[key]
    size_max = int(spec["max_len"])  # type: ignore[call-overload]
    fixed = spec["len_type"] == 0
    if spec["data_enc"] == "b":
        return st.binary(min_size=size_max if fixed else 0, max_size=size_max)
    alphabet = st.characters(min_codepoint=32, max_codepoint=126)
    return st.text(alphabet=alphabet, min_size=size_max if fixed else 0, max_size=min(size_max, 60))


_FIELD_KEYS = [str(number) for number in range(2, 129) if number != 65]
random_docs = st.builds(
    lambda mti, fields: {"t": mti, **fields},
    st.from_regex(r"[0-9]{4}", fullmatch=True),
    st.dictionaries(st.sampled_from(_FIELD_KEYS), st.just(None), max_size=25),
).flatmap(
    lambda doc: st.fixed_dictionaries(
        {key: (st.just(value) if key == "t" else _field_value(key)) for key, value in doc.items()}
    )
)


@given(random_docs)
@settings(max_examples=300, deadline=None)
def test_fast_codec_matches_pyiso8583_on_random_messages(doc: dict[str, str | bytes]) -> None:
    fast = codec.encode(doc)
    assert fast == codec._encode_slow(doc)
    pyiso_doc = {
        key: value.hex().upper() if isinstance(value, bytes) else value
        for key, value in doc.items()
    }
    assert fast == bytes(iso8583.encode(pyiso_doc, iso8583.specs.default)[0])
    assert codec.decode(fast) == codec._decode_slow(fast) == doc


@given(st.binary(max_size=200), st.sampled_from([b"", b"0100", b"0800", b"0400"]))
@settings(max_examples=500)
def test_fast_decode_matches_pyiso8583_on_random_bytes(tail: bytes, head: bytes) -> None:
    raw = head + tail
    try:
        expected: object = codec._decode_slow(raw)
    except IsoDecodeError as error:
        expected = (error.field, error.reason)
    try:
        got: object = codec.decode(raw)
    except IsoDecodeError as error:
        got = (error.field, error.reason)
    assert got == expected


def test_fast_path_handles_the_typical_messages() -> None:
    for doc in (authorization(), reversal(), NETWORK, authorization(f35=f"{PAN}=2812101", f2=None)):
        raw = codec._encode_fast(doc)
        assert codec._decode_fast(raw) == doc


def test_fast_encode_falls_back_for_errors() -> None:
    bad_docs = ({"t": "0100", "4": "123"}, {"t": "0100", "52": "ABC"}, {"t": "01000", "3": "0" * 6})
    for doc in bad_docs:
        with pytest.raises(IsoEncodeError):
            codec.encode(doc)
    # A doc with a bytearray PIN block and a stale secondary bitmap still encodes (slow path).
    block = encrypt_pin_block("1234", PAN, ZPK)
    doc = {"t": "0100", "2": PAN, "52": bytearray(block), "1": "00"}
    assert codec.encode(doc) == codec.encode({"t": "0100", "2": PAN, "52": block})


# --------------------------------------------------------------------------------------------
# parse_mti and message classes


def test_message_classes_match_the_contract() -> None:
    assert MESSAGE_CLASSES == {
        "0100": "0110",
        "0120": "0130",
        "0200": "0210",
        "0220": "0230",
        "0400": "0410",
        "0420": "0430",
        "0800": "0810",
    }
    assert all(type(key) is str and type(value) is str for key, value in MESSAGE_CLASSES.items())


@pytest.mark.parametrize("mti", ["0300", "0110", "0810", "0500", "01A0", "100", "", "0802", "1100"])
def test_unsupported_mti(mti: str) -> None:
    with pytest.raises(UnsupportedMti):
        parse_mti({"t": mti})
    with pytest.raises(UnsupportedMti):
        parse_request({"t": mti, **{k: v for k, v in authorization().items() if k != "t"}})


def test_missing_mti_is_unsupported() -> None:
    with pytest.raises(UnsupportedMti):
        parse_mti({})


def test_unsupported_mti_is_a_format_error_on_field_0() -> None:
    with pytest.raises(FormatError) as raised:
        parse_request({"t": "0300"})
    assert isinstance(raised.value, UnsupportedMti)
    assert raised.value.field == 0 and raised.value.mti == "0300"
    assert "0300" in str(raised.value)


@pytest.mark.parametrize(
    ("mti", "expected"), [("0101", "0110"), ("0121", "0130"), ("0421", "0430"), ("0400", "0410")]
)
def test_repeats_are_accepted_as_their_class(mti: str, expected: str) -> None:
    assert parse_mti({"t": mti}) == mti
    assert response_mti(mti) == expected


# --------------------------------------------------------------------------------------------
# parse_request: valid messages


def test_parse_typical_authorization() -> None:
    doc = authorization()
    request = parse_request(doc)
    assert isinstance(request, AuthRequest)
    assert request.mti == "0100" and request.response_mti == "0110"
    assert request.pan == PAN and request.expiry_yymm == "2812" and request.service_code is None
    assert request.processing_code == "000000" and request.transaction_type == "00"
    assert request.amount == 1234 and request.currency_numeric == "978"
    assert request.currency == "EUR"
    assert request.billing_amount is None and request.billing_currency is None
    assert request.transmission_datetime == "0612153045" and request.stan == "123456"
    assert request.local_time == "153045" and request.local_date == "0612"
    assert request.mcc == "5411" and request.pos_entry_mode == "010"
    assert request.acquirer_id == "12345678" and request.rrn == "ABC123456789"
    assert request.terminal_id == "TERM0001" and request.merchant_id == "MERCHANT0000001"
    assert request.country == "DE"
    assert request.field48 == {"92": "123"} and request.cvc2 == "123"
    assert request.pin_block == doc["52"]
    assert request.original is None and request.replacement_amount is None
    assert request.raw is doc


def test_parse_minimal_authorization() -> None:
    doc = {
        key: value
        for key, value in authorization().items()
        if key in ("t", "2", "3", "4", "7", "11", "32", "37", "41", "49")
    }
    request = parse_request(doc)
    assert isinstance(request, AuthRequest)
    assert request.expiry_yymm is None and request.cvc2 is None and request.pin_block is None
    assert request.country is None and request.mcc is None and request.field48 == {}


def test_parse_track2_instead_of_pan_and_expiry() -> None:
    request = parse_request(authorization(f2=None, f14=None, f35=f"{PAN}D2812201123"))
    assert isinstance(request, AuthRequest)
    assert (request.pan, request.expiry_yymm, request.service_code) == (PAN, "2812", "201")
    both = parse_request(authorization(f35=f"{PAN}=2812101"))
    assert isinstance(both, AuthRequest) and both.service_code == "101"


def test_parse_billing_amount_and_currency() -> None:
    request = parse_request(authorization(f6="000000001500", f51="840"))
    assert isinstance(request, AuthRequest)
    assert request.billing_amount == 1500 and request.billing_currency == "USD"
    assert request.billing_currency_numeric == "840"


@pytest.mark.parametrize("mti", ["0100", "0120", "0200", "0220"])
def test_zero_amount_and_invalid_luhn_are_not_format_errors(mti: str) -> None:
    bad_luhn = PAN[:-1] + str((int(PAN[-1]) + 1) % 10)
    request = parse_request(authorization(t=mti, f4="000000000000", f2=bad_luhn, f52=None))
    assert isinstance(request, AuthRequest) and request.amount == 0 and request.pan == bad_luhn


@pytest.mark.parametrize("length", [12, 19])
def test_pan_length_bounds_accepted(length: int) -> None:
    pan = generate_pan("535522", 7, length)
    request = parse_request(authorization(f2=pan, f52=None))
    assert isinstance(request, AuthRequest) and request.pan == pan


@pytest.mark.parametrize("mti", ["0400", "0420", "0401", "0421"])
def test_parse_reversal(mti: str) -> None:
    request = parse_request(reversal(mti))
    assert isinstance(request, AuthRequest)
    assert request.original is not None and request.original.mti == "0100"
    assert request.replacement_amount == 1000
    original = parse_request(authorization())
    assert isinstance(original, AuthRequest)
    assert request.original.key == original.original_key


def test_parse_network_management() -> None:
    request = parse_request(dict(NETWORK))
    assert isinstance(request, NetworkRequest)
    assert request.network_code == NetworkCode.echo and request.stan == "000001"
    assert request.response_mti == "0810"
    for code in ("001", "002", "301"):
        network = parse_request(dict(NETWORK, **{"70": code}))
        assert isinstance(network, NetworkRequest) and network.network_code == code


def test_parse_request_accepts_a_decoded_wire_message() -> None:
    for doc in (authorization(), reversal(), NETWORK):
        assert parse_request(codec.decode(codec.encode(doc))) == parse_request(doc)


# --------------------------------------------------------------------------------------------
# parse_request: format errors


def _without(doc: dict[str, str | bytes], field: int) -> dict[str, str | bytes]:
    doc = dict(doc)
    doc.pop(str(field))
    if field == 2:
        doc.pop("35", None)
    return doc


def _sample(klass: str) -> dict[str, str | bytes]:
    if klass == "0800":
        return dict(NETWORK)
    if klass in ("0400", "0420"):
        return reversal(klass)
    return authorization(t=klass)


MANDATORY_CASES = [(klass, field) for klass, fields in MANDATORY_FIELDS.items() for field in fields]


@pytest.mark.parametrize(("klass", "field"), MANDATORY_CASES)
def test_every_mandatory_field_omission_is_a_format_error(klass: str, field: int) -> None:
    assert isinstance(parse_request(_sample(klass)), (AuthRequest, NetworkRequest))
    with pytest.raises(FormatError) as raised:
        parse_request(_without(_sample(klass), field))
    assert raised.value.field == field


def test_mandatory_fields_match_the_contract() -> None:
    card = (2, 3, 4, 7, 11, 32, 37, 41, 49)
    assert {klass: set(fields) for klass, fields in MANDATORY_FIELDS.items()} == {
        "0100": set(card),
        "0120": set(card),
        "0200": set(card),
        "0220": set(card),
        "0400": {*card, 90},
        "0420": {*card, 90},
        "0800": {7, 11, 70},
    }


BAD_FIELDS: list[tuple[dict[str, str | bytes | None], int]] = [
    ({"f4": "00000000012A"}, 4),
    ({"f4": "1234"}, 4),
    ({"f4": "-00000001234"}, 4),
    ({"f4": "１２３４５６７８９０１２"}, 4),  # full-width digits
    ({"f2": "53552200000A1234"}, 2),
    ({"f2": "53552200000"}, 2),  # 11 digits
    ({"f2": "53552200000012345678"}, 2),  # 20 digits
    ({"f2": ""}, 2),
    ({"f3": "00000"}, 3),
    ({"f3": "00A000"}, 3),
    ({"f7": "1312153045"}, 7),  # month 13
    ({"f7": "0632153045"}, 7),  # day 32
    ({"f7": "0612243045"}, 7),  # hour 24
    ({"f7": "0612156045"}, 7),  # minute 60
    ({"f7": "061215304"}, 7),
    ({"f11": "12345A"}, 11),
    ({"f12": "250000"}, 12),
    ({"f13": "1301"}, 13),
    ({"f14": "2813"}, 14),  # month 13
    ({"f14": "2800"}, 14),
    ({"f14": "28A2"}, 14),
    ({"f18": "541"}, 18),
    ({"f22": "01"}, 22),
    ({"f32": ""}, 32),
    ({"f32": "123456789012"}, 32),
    ({"f32": "12345A"}, 32),
    ({"f37": "            "}, 37),  # blank
    ({"f37": "ABC"}, 37),
    ({"f41": "TERM001"}, 41),
    ({"f41": "TERM\x00001"}, 41),
    ({"f42": "SHORT"}, 42),
    ({"f48": "920312"}, 48),  # truncated subelement
    ({"f48": "9202123"}, 48),  # subelement "12", then "3" is a truncated header
    ({"f48": "9204123" + "4"}, 48),  # CVC2 4 digits
    ({"f48": "92031A3"}, 48),  # CVC2 not digits
    ({"f49": "999"}, None),  # XXX is an ISO 4217 code: not a format error (the hot path says 57)
    ({"f49": "000"}, 49),
    ({"f49": "97"}, 49),
    ({"f49": "EUR"}, 49),
    ({"f6": "000000001500"}, 51),  # billing amount without currency
    ({"f51": "840"}, 6),  # billing currency without amount
    ({"f6": "000000001500", "f51": "001"}, 51),
    ({"f6": "00000000150X", "f51": "840"}, 6),
    ({"f52": b"\x00" * 7}, 52),
    ({"f52": "0011"}, 52),
    ({"f35": f"{PAN}2812101"}, 35),  # no separator
    ({"f35": "5355220000001242=2812101"}, 35),  # track 2 PAN differs from field 2
    ({"f35": f"{PAN}=2712101"}, 14),  # field 14 differs from the track 2 expiry
    ({"f2": None, "f14": None, "f35": f"{PAN}=2813101"}, 35),
    ({"f3": b"000000"}, 3),  # bytes where text is due
]


@pytest.mark.parametrize(("changes", "field"), BAD_FIELDS)
def test_malformed_fields_are_format_errors(
    changes: dict[str, str | bytes | None], field: int | None
) -> None:
    doc = authorization(**changes)
    if field is None:
        assert isinstance(parse_request(doc), AuthRequest)
        return
    with pytest.raises(FormatError) as raised:
        parse_request(doc)
    assert raised.value.field == field


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"f90": "0" * 41}, 90),
        ({"f90": "0100123456061215304500012345678000000000AB"}, 90),
        ({"f95": "0" * 41}, 95),
        ({"f95": "00000000100X" + "0" * 30}, 95),
    ],
)
def test_malformed_reversal_fields(changes: dict[str, str | None], field: int) -> None:
    with pytest.raises(FormatError) as raised:
        parse_request(reversal(**changes))
    assert raised.value.field == field


@pytest.mark.parametrize(("field", "value"), [("7", "1312153045"), ("11", "00000A"), ("70", "31")])
def test_malformed_network_fields(field: str, value: str) -> None:
    with pytest.raises(FormatError) as raised:
        parse_request(dict(NETWORK, **{field: value}))
    assert raised.value.field == int(field)


def test_no_exception_or_repr_contains_card_data() -> None:
    track = f"{PAN}=2812101999"
    cases: list[Callable[[], object]] = [
        lambda: parse_request(authorization(f2=PAN + "X")),
        lambda: parse_request(authorization(f2=PAN + "1234")),
        lambda: parse_request(authorization(f35=f"{PAN}=2899101999", f2=None, f14=None)),
        lambda: parse_request(authorization(f35=PAN + "99=2812101")),
        lambda: parse_request(authorization(f48="0216" + PAN + "92")),
        lambda: parse_request(authorization(f48="9203" + PAN)),
        lambda: parse_request(authorization(f14="2899")),
        lambda: parse_request(authorization(f52=PAN.encode())),
        lambda: parse_request(authorization(f4=PAN[:12] + "X")),
        lambda: codec.decode(codec.encode(authorization())[:40]),
    ]
    for case in cases:
        with pytest.raises((FormatError, IsoDecodeError)) as raised:
            case()
        for text in (str(raised.value), repr(raised.value)):
            assert PAN not in text and PAN[:12] not in text and "2812" not in text
    request = parse_request(authorization(f35=track))
    text = repr(request)
    assert PAN not in text and "535522******1234" in text
    assert "2812" not in text and "'123'" not in text and "raw" not in text
    assert "pin_block" not in text


def test_requests_are_frozen() -> None:
    request = parse_request(authorization())
    with pytest.raises(AttributeError):
        request.amount = 1  # type: ignore[misc]
    network = parse_request(dict(NETWORK))
    with pytest.raises(AttributeError):
        network.stan = "000002"  # type: ignore[misc]
    assert "NetworkRequest(mti='0800'" in repr(network)


# --------------------------------------------------------------------------------------------
# Duplicate keys


def test_duplicate_key_fields_and_repeat_normalisation() -> None:
    original = parse_request(authorization())
    repeat = parse_request(authorization(t="0101"))
    advice = parse_request(authorization(t="0120"))
    assert isinstance(original, AuthRequest) and isinstance(repeat, AuthRequest)
    assert isinstance(advice, AuthRequest)
    assert original.duplicate_key == ("0100", "00012345678", "123456", "0612153045", "ABC123456789")
    assert repeat.duplicate_key == original.duplicate_key
    assert advice.duplicate_key != original.duplicate_key
    padded = parse_request(authorization(f32="00012345678"))
    assert padded.duplicate_key == original.duplicate_key  # type: ignore[union-attr]
    changes = (("11", "123457"), ("7", "0612153046"), ("37", "ABC123456780"), ("32", "1"))
    for field, value in changes:
        other = parse_request(authorization(**{field: value}))
        assert other.duplicate_key != original.duplicate_key, field  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Responses


def test_response_doc_echoes_the_contract_fields() -> None:
    request_doc = authorization(f6="000000001500", f51="840", f35=f"{PAN}=2812101")
    response = response_doc(request_doc, "0110", "00")
    assert response["t"] == "0110" and response["39"] == "00"
    for field in ("2", "3", "4", "6", "7", "11", "32", "37", "41", "42", "49", "51"):
        assert response[field] == request_doc[field]
    for field in ("14", "35", "48", "52", "12", "13", "18", "22", "43"):
        assert field not in response
    decoded = codec.decode(codec.encode(response))
    assert decoded == response


def test_response_doc_for_network_and_reversal_and_minimal() -> None:
    assert response_doc(NETWORK, "0810", "00") == {**NETWORK, "t": "0810", "39": "00"}
    reversal_response = response_doc(reversal(), "0410", "00")
    assert reversal_response["90"] == reversal()["90"]
    minimal = response_doc({"t": "0100", "11": "000001"}, "0110", "30")
    assert minimal == {"t": "0110", "11": "000001", "39": "30"}
    with pytest.raises(AssertionError):
        response_doc(NETWORK, "0800", "00")


def test_full_path_cost_is_near_the_codec_floor() -> None:
    # decode + parse + response + encode of a typical 0100: loose bound for busy machines.
    raw = codec.encode(authorization())

    def one() -> bytes:
        request = parse_request(codec.decode(raw))
        response = response_doc(request.raw, request.response_mti, "00")
        response["38"] = "A1B2C3"
        return codec.encode(response)

    one()
    start = time.perf_counter()
    for _ in range(500):
        one()
    cost_us = (time.perf_counter() - start) / 500 * 1e6
    assert cost_us < 2000, cost_us
