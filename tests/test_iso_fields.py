"""Structured ISO 8583 fields (48, 35, 90, 95, 54, 3, 43) and the ISO 4217 table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authsrv.iso import currency
from authsrv.iso.fields import (
    FieldError,
    OriginalData,
    Track2,
    build_field48,
    build_field54,
    build_field90,
    build_field95,
    country_from_field43,
    mti_class,
    normalise_acquirer_id,
    parse_field48,
    parse_field90,
    parse_field95,
    parse_track2,
    processing_code,
)

PAN = "5355220000001234"

# --------------------------------------------------------------------------------------------
# Field 48


def test_parse_field48_subelements_in_order() -> None:
    assert parse_field48("9203123" + "0105HELLO" + "1000") == {"92": "123", "01": "HELLO", "10": ""}
    assert parse_field48("") == {}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("9", "header cut after 1 character"),
        ("920", "header cut after 3 characters"),
        ("9203", "value missing"),
        ("920312", "value truncated"),
        ("9203123" + "01", "second header truncated"),
        ("9A03123", "tag not numeric"),
        ("92X3123", "length not numeric"),
        ("92 3123", "length with a space"),
        ("9203123" + "9203456", "tag twice"),
        ("92-1123", "negative length"),
    ],
)
def test_parse_field48_rejects_bad_structure(value: str, why: str) -> None:
    with pytest.raises(FieldError):
        parse_field48(value)


def test_parse_field48_error_does_not_quote_the_value() -> None:
    with pytest.raises(FieldError) as raised:
        parse_field48("9203123" + "0120" + PAN)
    assert PAN not in str(raised.value)


subelements = st.dictionaries(
    st.from_regex(r"[0-9]{2}", fullmatch=True),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    max_size=10,
)


@given(subelements)
def test_field48_round_trip(values: dict[str, str]) -> None:
    assert parse_field48(build_field48(values)) == values


def test_build_field48_limits() -> None:
    with pytest.raises(FieldError):
        build_field48({"9": "x"})
    with pytest.raises(FieldError):
        build_field48({"92": "x" * 100})
    with pytest.raises(FieldError):
        build_field48({f"{tag:02d}": "x" * 99 for tag in range(11)})  # 1111 characters


# --------------------------------------------------------------------------------------------
# Track 2


@pytest.mark.parametrize("separator", ["=", "D"])
def test_parse_track2(separator: str) -> None:
    track = parse_track2(f"{PAN}{separator}2812101123456789")
    assert track == Track2(PAN, "2812", "101", "123456789")


def test_parse_track2_with_sentinels_and_no_discretionary_data() -> None:
    assert parse_track2(f";{PAN}=2812201?") == Track2(PAN, "2812", "201", "")


def test_track2_repr_masks_card_data() -> None:
    track = parse_track2(f"{PAN}=2812101999")
    text = repr(track)
    assert PAN not in text and "2812" not in text and "535522******1234" in text


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (f"{PAN}2812101", "no separator"),
        (f"{PAN[:11]}=2812101", "PAN 11 digits"),
        (f"{PAN}1234=2812101", "PAN 20 digits"),
        ("53552A0000001234=2812101", "PAN with a letter"),
        (f"{PAN}=2813101", "month 13"),
        (f"{PAN}=2800101", "month 00"),
        (f"{PAN}=281", "expiry truncated"),
        (f"{PAN}=281210", "service code truncated"),
        (f"{PAN}=28121O1", "service code with a letter"),
        ("=2812101", "empty PAN"),
    ],
)
def test_parse_track2_rejects(value: str, why: str) -> None:
    with pytest.raises(FieldError) as raised:
        parse_track2(value)
    assert PAN not in str(raised.value), why


# --------------------------------------------------------------------------------------------
# Fields 90 and 95


def test_field90_round_trip_and_layout() -> None:
    text = build_field90("0100", "123456", "0612153045", "12345678")
    assert text == "0100" + "123456" + "0612153045" + "00012345678" + "0" * 11
    assert len(text) == 42
    original = parse_field90(text)
    assert original == OriginalData("0100", "123456", "0612153045", "00012345678")
    assert original.key == ("0100", "00012345678", "123456", "0612153045")


@pytest.mark.parametrize(
    "value",
    [
        "0" * 41,
        "0" * 43,
        "",
        "0100123456061215304500012345678" + "0000000000A",
        "0100123456131215304500012345678" + "0" * 11,  # original month 13
    ],
)
def test_parse_field90_rejects(value: str) -> None:
    with pytest.raises(FieldError):
        parse_field90(value)


def test_build_field90_rejects_bad_parts() -> None:
    with pytest.raises(FieldError):
        build_field90("100", "123456", "0612153045", "1")
    with pytest.raises(FieldError):
        build_field90("0100", "123456", "0612153045", "123456789012")  # field 32 over 11 digits
    with pytest.raises(FieldError):
        build_field90("0100", "12345A", "0612153045", "1")


def test_mti_class_and_acquirer_normalisation() -> None:
    assert mti_class("0101") == mti_class("0100") == "0100"
    assert mti_class("0421") == "0420"
    assert mti_class("0120") != mti_class("0100")
    assert normalise_acquirer_id("123") == "00000000123"
    assert normalise_acquirer_id("00000000123") == "00000000123"


def test_field95_round_trip() -> None:
    assert build_field95(2500) == "000000002500" + "0" * 30
    assert parse_field95(build_field95(2500)) == 2500
    assert parse_field95(build_field95(0)) == 0


@pytest.mark.parametrize(
    "value", ["0" * 41, "0" * 43, "00000000250A" + "0" * 30, "000000002500" + "0" * 29 + " "]
)
def test_parse_field95_rejects(value: str) -> None:
    with pytest.raises(FieldError):
        parse_field95(value)


def test_build_field95_rejects_out_of_range() -> None:
    with pytest.raises(FieldError):
        build_field95(-1)
    with pytest.raises(FieldError):
        build_field95(10**12)


# --------------------------------------------------------------------------------------------
# Fields 54, 3, 43


def test_build_field54() -> None:
    assert build_field54(12345, "978") == "0002978C000000012345"
    assert build_field54(0, "978") == "0002978C000000000000"
    assert build_field54(-500, "840") == "0002840D000000000500"
    assert len(build_field54(999_999_999_999, "392")) == 20


@pytest.mark.parametrize(
    ("amount", "code"), [(10**12, "978"), (-(10**12), "978"), (1, "97"), (1, "EUR")]
)
def test_build_field54_rejects(amount: int, code: str) -> None:
    with pytest.raises(FieldError):
        build_field54(amount, code)


def test_processing_code() -> None:
    assert processing_code("000000") == ("00", "00", "00")
    assert processing_code("013000") == ("01", "30", "00")
    for bad in ("00000", "0000000", "00000A", ""):
        with pytest.raises(FieldError):
            processing_code(bad)


@pytest.mark.parametrize(
    ("value", "country"),
    [
        ("ACME STORE               BERLIN       DE", "DE"),
        ("SHOP                     PARIS        fr", "FR"),
        ("SHOP                     NOWHERE      1 ", None),
        ("SHOP                     NOWHERE        ", None),
        ("X", None),
        ("", None),
    ],
)
def test_country_from_field43(value: str, country: str | None) -> None:
    assert country_from_field43(value) == country


# --------------------------------------------------------------------------------------------
# ISO 4217


@pytest.mark.parametrize(
    ("alpha", "numeric", "exponent"),
    [
        ("EUR", "978", 2),
        ("USD", "840", 2),
        ("GBP", "826", 2),
        ("JPY", "392", 0),
        ("KRW", "410", 0),
        ("BHD", "048", 3),
        ("KWD", "414", 3),
        ("TND", "788", 3),
        ("CLF", "990", 4),
        ("UYW", "927", 4),
        ("ALL", "008", 2),
        ("ISK", "352", 0),
        ("XOF", "952", 0),
        ("XCG", "532", 2),  # Caribbean guilder, replaced ANG in 2025
        ("ZWG", "924", 2),  # Zimbabwe Gold, replaced ZWL in 2024
        ("SLE", "925", 2),
        ("VES", "928", 2),
        ("VED", "926", 2),
        ("MRU", "929", 2),
        ("STN", "930", 2),
    ],
)
def test_currency_table_entries(alpha: str, numeric: str, exponent: int) -> None:
    entry = currency.by_alpha(alpha)
    assert entry is not None and entry.numeric == numeric and entry.exponent == exponent
    assert currency.by_numeric(numeric) == entry
    assert currency.numeric_to_alpha(numeric) == alpha
    assert currency.alpha_to_numeric(alpha) == numeric
    assert currency.numeric_code(alpha) == numeric
    assert currency.exponent(alpha) == exponent


def test_currency_table_is_complete_and_consistent() -> None:
    assert len(currency.CURRENCIES) >= 178
    for entry in currency.CURRENCIES:
        assert len(entry.alpha) == 3 and entry.alpha.isupper()
        assert len(entry.numeric) == 3 and entry.numeric.isdigit()
        assert entry.exponent in (None, 0, 2, 3, 4)
    assert {"HRK", "SLL", "ZWL", "CUC", "ANG"}.isdisjoint(currency.BY_ALPHA)  # withdrawn


def test_currency_unknown_and_not_applicable() -> None:
    assert currency.by_numeric("000") is None
    assert currency.by_alpha("ABC") is None
    with pytest.raises(KeyError):
        currency.numeric_to_alpha("001")
    with pytest.raises(KeyError):
        currency.alpha_to_numeric("EURO")
    assert currency.by_alpha("XAU").exponent is None  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        currency.exponent("XAU")
