"""Pure helpers for the structured ISO 8583 fields of docs/contract.md, wire profile.

Each parser takes the field's text as decoded by `codec.decode` and either returns a typed value
or raises FieldError with a reason that never quotes the field (field 35 and 48 carry card data).
Builders are the exact inverse of their parsers.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from authsrv.cardsec import PAN_LENGTH_MAX, PAN_LENGTH_MIN, mask_pan

FIELD48_SIZE_MAX = 999  # LLL
SUBELEMENT_TAG_SIZE = 2
SUBELEMENT_LENGTH_SIZE = 2
SUBELEMENT_VALUE_SIZE_MAX = 99
FIELD90_SIZE = 42
FIELD95_SIZE = 42
AMOUNT_DIGITS = 12
AMOUNT_MAX = 10**AMOUNT_DIGITS - 1
ACQUIRER_ID_DIGITS = 11
TRACK2_SEPARATORS = ("=", "D")


class FieldError(ValueError):
    """A field's content does not have the structure the profile requires."""


def is_digits(value: str) -> bool:
    """ASCII decimal digits only, at least one (str.isdigit alone also accepts e.g. '²')."""
    return value.isascii() and value.isdigit()


def is_month(value: str) -> bool:
    return len(value) == 2 and is_digits(value) and "01" <= value <= "12"


# ---------------------------------------------------------------------------------------------
# Field 48: additional data, a list of `TT LL value` subelements


def parse_field48(value: str) -> dict[str, str]:
    """Subelements by tag, in wire order. Raises FieldError on a truncated or malformed list or on
    a tag that appears twice (which one would win is ambiguous)."""
    if len(value) > FIELD48_SIZE_MAX:
        raise FieldError(f"field 48 longer than {FIELD48_SIZE_MAX}")
    subelements: dict[str, str] = {}
    position = 0
    end = len(value)
    # Each iteration consumes at least 4 characters: at most 250 iterations.
    while position < end:
        header_end = position + SUBELEMENT_TAG_SIZE + SUBELEMENT_LENGTH_SIZE
        header = value[position:header_end]
        if len(header) != SUBELEMENT_TAG_SIZE + SUBELEMENT_LENGTH_SIZE:
            raise FieldError(f"field 48 truncated in a subelement header at position {position}")
        if not (header.isdigit() and header.isascii()):
            raise FieldError(f"field 48 subelement header at position {position} is not numeric")
        tag = header[:SUBELEMENT_TAG_SIZE]
        value_end = header_end + int(header[SUBELEMENT_TAG_SIZE:])
        if value_end > end:
            raise FieldError(f"field 48 subelement {tag} runs past the end of the field")
        if tag in subelements:
            raise FieldError(f"field 48 subelement {tag} appears twice")
        subelements[tag] = value[header_end:value_end]
        position = value_end
    assert position == end
    return subelements


def build_field48(subelements: Mapping[str, str]) -> str:
    parts = []
    for tag, value in subelements.items():
        if len(tag) != SUBELEMENT_TAG_SIZE or not is_digits(tag):
            raise FieldError("field 48 subelement tag must be 2 digits")
        if len(value) > SUBELEMENT_VALUE_SIZE_MAX:
            raise FieldError(f"field 48 subelement {tag} longer than {SUBELEMENT_VALUE_SIZE_MAX}")
        parts.append(f"{tag}{len(value):02d}{value}")
    text = "".join(parts)
    if len(text) > FIELD48_SIZE_MAX:
        raise FieldError(f"field 48 longer than {FIELD48_SIZE_MAX}")
    return text


# ---------------------------------------------------------------------------------------------
# Field 35: track 2 equivalent data


@attrs.frozen
class Track2:
    pan: str = attrs.field(repr=mask_pan)
    expiry_yymm: str = attrs.field(repr=False)
    service_code: str
    discretionary: str = attrs.field(default="", repr=False)


def parse_track2(value: str) -> Track2:
    """PAN, separator ('=' or 'D'), expiry YYMM, service code, discretionary data (ISO 7813).
    Start and end sentinels (';' and '?') are tolerated."""
    text = value.removeprefix(";").removesuffix("?")
    # The PAN is digits only, so the first separator character found ends it.
    positions = [at for at in (text.find(separator) for separator in TRACK2_SEPARATORS) if at >= 0]
    if not positions:
        raise FieldError("track 2 has no field separator")
    separator_at = min(positions)
    pan = text[:separator_at]
    if not PAN_LENGTH_MIN <= len(pan) <= PAN_LENGTH_MAX or not is_digits(pan):
        raise FieldError("track 2 PAN must be 12 to 19 digits")
    rest = text[separator_at + 1 :]
    expiry, service_code = rest[:4], rest[4:7]
    if len(expiry) != 4 or not is_digits(expiry) or not is_month(expiry[2:]):
        raise FieldError("track 2 expiry must be YYMM")
    if len(service_code) != 3 or not is_digits(service_code):
        raise FieldError("track 2 service code must be 3 digits")
    return Track2(pan, expiry, service_code, rest[7:])


# ---------------------------------------------------------------------------------------------
# Field 90: original data elements; field 95: replacement amounts


def mti_class(mti: str) -> str:
    """The MTI with its origin digit cleared, so a repeat (0101, 0421) is the same message class as
    the original (0100, 0420): ISO 8583:1987 uses the last digit for origin and repetition only."""
    return mti[:3] + "0"


@attrs.frozen
class OriginalData:
    mti: str  # e.g. "0100"
    stan: str  # field 11 of the original, 6 digits
    transmission_datetime: str  # field 7 of the original, MMDDhhmmss
    acquirer_id: str  # field 32 of the original, 11 digits right-aligned and zero-filled

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Equal to `AuthRequest.original_key` of the message this one refers to."""
        return (mti_class(self.mti), self.acquirer_id, self.stan, self.transmission_datetime)


def normalise_acquirer_id(field32: str) -> str:
    """Field 32 as field 90 carries it (11 digits, zero-filled), so the two compare equal."""
    return field32.zfill(ACQUIRER_ID_DIGITS)


def parse_field90(value: str) -> OriginalData:
    """MTI (4), STAN (6), field 7 (10), field 32 (11, zero-filled), 11 zeros: 42 digits."""
    if len(value) != FIELD90_SIZE:
        raise FieldError(f"field 90 must be {FIELD90_SIZE} characters, not {len(value)}")
    if not is_digits(value):
        raise FieldError("field 90 must be all digits")
    original = OriginalData(value[0:4], value[4:10], value[10:20], value[20:31])
    if not is_month(original.transmission_datetime[:2]):
        raise FieldError("field 90 original transmission date has no valid month")
    # The last 11 digits (original forwarding institution) are zeros in this profile; other
    # values are tolerated because some acquirers fill them and nothing here depends on them.
    return original


def build_field90(mti: str, stan: str, transmission_datetime: str, acquirer_id: str) -> str:
    acquirer = normalise_acquirer_id(acquirer_id)
    text = mti + stan + transmission_datetime + acquirer + "0" * 11
    if not (len(mti), len(stan), len(transmission_datetime), len(acquirer)) == (4, 6, 10, 11):
        raise FieldError("field 90 parts must be 4, 6, 10 and at most 11 digits")
    if not is_digits(text):
        raise FieldError("field 90 parts must be digits")
    assert len(text) == FIELD90_SIZE
    return text


def parse_field95(value: str) -> int:
    """The amount that remains after a partial reversal: the first 12 digits of 42."""
    if len(value) != FIELD95_SIZE:
        raise FieldError(f"field 95 must be {FIELD95_SIZE} characters, not {len(value)}")
    amount = value[:AMOUNT_DIGITS]
    if not is_digits(amount):
        raise FieldError("field 95 actual amount must be 12 digits")
    # The rest (settlement amount, fees with C/D signs) is zeros in this profile; tolerated.
    if not value[AMOUNT_DIGITS:].isascii() or not value[AMOUNT_DIGITS:].isalnum():
        raise FieldError("field 95 has characters outside the profile")
    return int(amount)


def build_field95(amount: int) -> str:
    if not 0 <= amount <= AMOUNT_MAX:
        raise FieldError("field 95 amount must be 0 to 12 digits")
    text = f"{amount:012d}" + "0" * (FIELD95_SIZE - AMOUNT_DIGITS)
    assert len(text) == FIELD95_SIZE
    return text


# ---------------------------------------------------------------------------------------------
# Field 54, field 3, field 43


def build_field54(amount_minor: int, currency_numeric: str) -> str:
    """One additional-amount entry: account type 00, amount type 02 (available balance),
    currency, C (credit, >= 0) or D (debit, < 0), 12 digits. 20 characters."""
    if len(currency_numeric) != 3 or not is_digits(currency_numeric):
        raise FieldError("field 54 currency must be 3 digits")
    if abs(amount_minor) > AMOUNT_MAX:
        raise FieldError("field 54 amount does not fit in 12 digits")
    sign = "C" if amount_minor >= 0 else "D"
    text = f"0002{currency_numeric}{sign}{abs(amount_minor):012d}"
    assert len(text) == 20
    return text


def processing_code(value: str) -> tuple[str, str, str]:
    """Field 3 as (transaction type, from account type, to account type), 2 digits each."""
    if len(value) != 6 or not is_digits(value):
        raise FieldError("processing code must be 6 digits")
    return value[0:2], value[2:4], value[4:6]


_ASCII_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Every pair of ASCII letters -> upper case (2,704 entries): one lookup per request.
_COUNTRY_OF_PAIR = {first + second: (first + second).upper() for first in _ASCII_LETTERS for second in _ASCII_LETTERS}


def country_from_field43(value: str) -> str | None:
    """The ISO 3166 alpha-2 country in the last 2 characters of field 43, or None if those are
    not two letters."""
    return _COUNTRY_OF_PAIR.get(value[-2:])
