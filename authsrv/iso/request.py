"""The typed edge of the ISO 8583 listener: a decoded doc in, an AuthRequest or NetworkRequest out.

Everything docs/contract.md, wire profile says about which fields a request must carry and what they may
contain is checked here, once, so the hot path works on validated values only:
- an MTI outside the contract's table raises UnsupportedMti (response code 12);
- a missing or malformed field raises FormatError naming the field (response code 30).
Business rules (is the amount allowed to be zero, is the PAN's Luhn digit right, is the
currency convertible) are not format questions and are left to the hot path: an invalid-Luhn PAN
is an unknown card (14), a zero amount may be an account verification or a 13.

Neither exception, nor any repr here, contains a PAN, expiry, CVC2, track 2 or PIN block.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import msgspec

from authsrv.cardsec import PAN_LENGTH_MAX, PAN_LENGTH_MIN, mask_pan
from authsrv.iso import currency
from authsrv.iso.fields import (
    AMOUNT_DIGITS,
    FieldError,
    OriginalData,
    country_from_field43,
    is_digits,
    mti_class,
    normalise_acquirer_id,
    parse_field48,
    parse_field90,
    parse_field95,
    parse_track2,
)

PIN_BLOCK_SIZE = 8
CVC2_SUBELEMENT = "92"  # field 48 subelement carrying the CVC2 (docs/contract.md, wire profile)


class Mti(enum.StrEnum):
    """The message classes of docs/contract.md, wire profile (requests and their responses)."""

    authorization = "0100"
    authorization_response = "0110"
    authorization_advice = "0120"
    authorization_advice_response = "0130"
    financial = "0200"
    financial_response = "0210"
    financial_advice = "0220"
    financial_advice_response = "0230"
    reversal = "0400"
    reversal_response = "0410"
    reversal_advice = "0420"
    reversal_advice_response = "0430"
    network = "0800"
    network_response = "0810"


# Request class -> response MTI. The response MTI is the request's plus 10.
MESSAGE_CLASSES: dict[str, str] = {
    str(request): str(response)
    for request, response in (
        (Mti.authorization, Mti.authorization_response),
        (Mti.authorization_advice, Mti.authorization_advice_response),
        (Mti.financial, Mti.financial_response),
        (Mti.financial_advice, Mti.financial_advice_response),
        (Mti.reversal, Mti.reversal_response),
        (Mti.reversal_advice, Mti.reversal_advice_response),
        (Mti.network, Mti.network_response),
    )
}
# Requests accepted as sent: each class plus its acquirer repeat (last digit 1, ISO 8583:1987),
# e.g. 0421 for a reversal advice the network sends again. A repeat belongs to the same class.
REQUEST_MTIS: frozenset[str] = frozenset(
    [*MESSAGE_CLASSES, *(klass[:3] + "1" for klass in MESSAGE_CLASSES if klass != Mti.network)]
)


class NetworkCode(enum.StrEnum):
    """Field 70 values of docs/contract.md, wire profile."""

    sign_on = "001"
    sign_off = "002"
    echo = "301"


# Mandatory fields per class, in the order they are checked; "2" stands for "2 or 35".
_CARD_FIELDS = (2, 3, 4, 7, 11, 32, 37, 41, 49)
MANDATORY_FIELDS: dict[str, tuple[int, ...]] = {
    "0100": _CARD_FIELDS,
    "0120": _CARD_FIELDS,
    "0200": _CARD_FIELDS,
    "0220": _CARD_FIELDS,
    "0400": (*_CARD_FIELDS, 90),
    "0420": (*_CARD_FIELDS, 90),
    "0800": (7, 11, 70),
}
assert MANDATORY_FIELDS.keys() == MESSAGE_CLASSES.keys()
# Fields a response echoes when the request has them (docs/contract.md, wire profile), plus 70 for network
# management and 90 for reversals, which acquirers match on.
ECHO_FIELDS = ("2", "3", "4", "6", "7", "11", "32", "37", "41", "42", "49", "51", "70", "90")


_REPR_HIDDEN = frozenset({"expiry_yymm", "field48", "cvc2", "pin_block", "raw"})


def _safe_repr(value: msgspec.Struct) -> str:
    parts = []
    for name in value.__struct_fields__:
        if name in _REPR_HIDDEN:
            continue
        field = getattr(value, name)
        parts.append(f"{name}={mask_pan(field) if name == 'pan' else repr(field)}")
    return f"{type(value).__name__}({', '.join(parts)})"


class FormatError(Exception):
    """A mandatory field is missing or a field is malformed: answer 30. Never carries values."""

    def __init__(self, field: int, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"format error in field {self.field}: {self.reason}"


class UnsupportedMti(FormatError):
    """The MTI is not one of the contract's request classes: answer 12, not 30.

    A FormatError on field 0 (the MTI's conventional number), so one `except FormatError` sees
    both; catch UnsupportedMti first, or test `field == 0`, to tell them apart.
    """

    def __init__(self, mti: str) -> None:
        # An MTI is never card data, but it may be any 4 characters: show only a printable form.
        shown = mti if mti.isascii() and mti.isprintable() and len(mti) <= 4 else "<unprintable>"
        super().__init__(0, f"unsupported MTI {shown!r}")
        self.mti = mti


class AuthRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A validated 01xx/02xx/04xx request. Amounts are minor units; codes are as on the wire.

    A frozen msgspec Struct rather than an attrs class: it is built once per message on the hot
    path, and with 29 fields msgspec builds it in about 1 us where a frozen attrs class takes 3.5.
    The repr masks the PAN and leaves out expiry, CVC2, PIN block, field 48 and the raw doc.
    """

    mti: str  # as sent, e.g. "0100" or the repeat "0101"
    pan: str
    expiry_yymm: str | None  # field 14, else track 2
    service_code: str | None  # track 2 only
    processing_code: str  # field 3, 6 digits
    amount: int  # field 4
    currency_numeric: str  # field 49
    currency: str  # field 49 as alpha
    billing_amount: int | None  # field 6
    billing_currency: str | None  # field 51 as alpha
    billing_currency_numeric: str | None  # field 51
    transmission_datetime: str  # field 7, MMDDhhmmss
    stan: str  # field 11
    local_time: str | None  # field 12, hhmmss
    local_date: str | None  # field 13, MMDD
    mcc: str | None  # field 18
    pos_entry_mode: str | None  # field 22
    acquirer_id: str  # field 32 as sent
    rrn: str  # field 37
    terminal_id: str  # field 41
    merchant_id: str | None  # field 42
    merchant_name_location: str | None  # field 43
    country: str | None  # field 43, last 2 characters
    field48: dict[str, str]
    cvc2: str | None  # field 48 subelement 92
    pin_block: bytes | None  # field 52, encrypted under the ZPK
    original: OriginalData | None  # field 90
    replacement_amount: int | None  # field 95, the amount that remains after a partial reversal
    raw: Mapping[str, str | bytes]  # the decoded message, for echoing fields in the response

    def __repr__(self) -> str:
        return _safe_repr(self)

    __str__ = __repr__

    @property
    def mti_class(self) -> str:
        """The MTI with the repeat digit cleared: 0101 -> 0100, 0421 -> 0420."""
        return mti_class(self.mti)

    @property
    def response_mti(self) -> str:
        return MESSAGE_CLASSES[mti_class(self.mti)]

    @property
    def transaction_type(self) -> str:
        """First two digits of the processing code: 00 purchase, 01 cash, 20 refund, ..."""
        return self.processing_code[:2]

    @property
    def duplicate_key(self) -> tuple[str, str, str, str, str]:
        """docs/contract.md, durability: same MTI class, field 32, field 11, field 7 and field 37.

        The MTI class treats a repeat as its original (0101 == 0100), which is what a repeat is
        for; an advice (0120) is a different class from a request (0100). Field 32 is compared
        zero-filled to 11 digits, as field 90 carries it.
        """
        return (
            mti_class(self.mti),
            normalise_acquirer_id(self.acquirer_id),
            self.stan,
            self.transmission_datetime,
            self.rrn,
        )

    @property
    def original_key(self) -> tuple[str, str, str, str]:
        """The key a later reversal's field 90 gives (`OriginalData.key`) for this message."""
        return (
            mti_class(self.mti),
            normalise_acquirer_id(self.acquirer_id),
            self.stan,
            self.transmission_datetime,
        )


class NetworkRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A validated 0800."""

    mti: str
    transmission_datetime: str  # field 7
    stan: str  # field 11
    network_code: str  # field 70, 3 digits (see NetworkCode)
    raw: Mapping[str, str | bytes]

    def __repr__(self) -> str:
        return _safe_repr(self)

    @property
    def response_mti(self) -> str:
        return MESSAGE_CLASSES[Mti.network]


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_mti(doc: Mapping[str, str | bytes]) -> str:
    """The request MTI as sent; UnsupportedMti if it is not a request class of the contract."""
    mti = doc.get("t")
    if not isinstance(mti, str) or mti not in REQUEST_MTIS:
        raise UnsupportedMti(mti if isinstance(mti, str) else "")
    return mti


def response_mti(request_mti: str) -> str:
    """0100 -> 0110, 0421 -> 0430. KeyError for an MTI outside the contract's table."""
    return MESSAGE_CLASSES[mti_class(request_mti)]


def parse_request(doc: Mapping[str, str | bytes]) -> AuthRequest | NetworkRequest:
    """Validate a decoded request. Raises UnsupportedMti (-> 12) or FormatError (-> 30)."""
    mti = parse_mti(doc)
    klass = mti_class(mti)
    for key in _MANDATORY_KEYS[klass]:
        if key not in doc and not (key == "2" and "35" in doc):
            raise FormatError(int(key), "mandatory field missing")
    _check_syntax(doc)
    if klass == _NETWORK_CLASS:
        return NetworkRequest(
            mti=mti,
            transmission_datetime=_transmission_datetime(doc["7"]),  # type: ignore[arg-type]
            stan=doc["11"],  # type: ignore[arg-type]
            network_code=doc["70"],  # type: ignore[arg-type]
            raw=doc,
        )
    return _parse_card_request(doc, mti)  # type: ignore[arg-type]


_MANDATORY_KEYS: dict[str, tuple[str, ...]] = {
    klass: tuple(str(field) for field in fields) for klass, fields in MANDATORY_FIELDS.items()
}

_REVERSAL_CLASSES = frozenset({str(Mti.reversal), str(Mti.reversal_advice)})
_NETWORK_CLASS = str(Mti.network)  # plain str: Enum attribute lookups cost ~150 ns each

# Syntax of the plain fields: key -> (length min, length max, digits only). Text fields are ISO
# "ans": printable ASCII, and not all blanks. One pass over the doc checks every field present.
_DIGITS, _TEXT = True, False
_SYNTAX: dict[str, tuple[int, int, bool]] = {
    "2": (PAN_LENGTH_MIN, PAN_LENGTH_MAX, _DIGITS),
    "3": (6, 6, _DIGITS),
    "4": (AMOUNT_DIGITS, AMOUNT_DIGITS, _DIGITS),
    "6": (AMOUNT_DIGITS, AMOUNT_DIGITS, _DIGITS),
    "7": (10, 10, _DIGITS),
    "11": (6, 6, _DIGITS),
    "12": (6, 6, _DIGITS),
    "13": (4, 4, _DIGITS),
    "14": (4, 4, _DIGITS),
    "18": (4, 4, _DIGITS),
    "22": (3, 3, _DIGITS),
    "32": (1, 11, _DIGITS),
    "37": (12, 12, _TEXT),
    "41": (8, 8, _TEXT),
    "42": (15, 15, _TEXT),
    "43": (1, 40, _TEXT),
    "49": (3, 3, _DIGITS),
    "51": (3, 3, _DIGITS),
    "70": (3, 3, _DIGITS),
}
# Fields parsed by their own rules below; they only need to be text.
_STRUCTURED = frozenset({"35", "48", "90", "95"})


def _check_syntax(doc: Mapping[str, str | bytes]) -> None:
    syntax = _SYNTAX
    for key, value in doc.items():
        rule = syntax.get(key)
        if rule is None:
            if key in _STRUCTURED and value.__class__ is not str:
                raise FormatError(int(key), "expected text")
            continue
        size_min, size_max, digits = rule
        # One combined test on the common path; _syntax_error works out what was wrong.
        if (
            value.__class__ is not str
            or not size_min <= len(value) <= size_max
            or not value.isascii()  # type: ignore[union-attr]
            or not (
                value.isdigit()  # type: ignore[union-attr]
                if digits
                else value.isprintable() and not value.isspace()  # type: ignore[union-attr]
            )
        ):
            raise _syntax_error(key, value, rule)


def _syntax_error(key: str, value: object, rule: tuple[int, int, bool]) -> FormatError:
    size_min, size_max, digits = rule
    if not isinstance(value, str):
        return FormatError(int(key), "expected text")
    kind = "digits" if digits else "printable ASCII characters, not all blank,"
    if size_min == size_max:
        return FormatError(int(key), f"must be {size_min} {kind}")
    return FormatError(int(key), f"must be {size_min} to {size_max} {kind}")


def _parse_card_request(doc: Mapping[str, str], mti: str) -> AuthRequest:
    # _check_syntax has run: every field in _SYNTAX that is present has the right length and
    # character set, so what remains are the rules that span characters or fields. Optional
    # fields are only looked at when present (each helper call costs ~0.1 us on the hot path).
    get = doc.get
    pan, expiry, service_code = _card(doc)
    currency_numeric = doc["49"]
    known = currency.BY_NUMERIC.get(currency_numeric)
    if known is None:
        raise FormatError(49, "unknown ISO 4217 currency code")
    billing_amount, billing_numeric, billing_alpha = (
        _billing(doc) if "6" in doc or "51" in doc else (None, None, None)
    )
    field48 = _field48(doc["48"]) if "48" in doc else {}
    merchant_name_location = get("43")
    original = _field90(doc["90"]) if "90" in doc else None
    assert original is not None or mti_class(mti) not in _REVERSAL_CLASSES  # mandatory check
    return AuthRequest(
        mti=mti,
        pan=pan,
        expiry_yymm=expiry,
        service_code=service_code,
        processing_code=doc["3"],
        amount=int(doc["4"]),
        currency_numeric=currency_numeric,
        currency=known.alpha,
        billing_amount=billing_amount,
        billing_currency=billing_alpha,
        billing_currency_numeric=billing_numeric,
        transmission_datetime=_transmission_datetime(doc["7"]),
        stan=doc["11"],
        local_time=_local_time(doc["12"]) if "12" in doc else None,
        local_date=_local_date(doc["13"]) if "13" in doc else None,
        mcc=get("18"),
        pos_entry_mode=get("22"),
        acquirer_id=doc["32"],
        rrn=doc["37"],
        terminal_id=doc["41"],
        merchant_id=get("42"),
        merchant_name_location=merchant_name_location,
        country=country_from_field43(merchant_name_location) if merchant_name_location else None,
        field48=field48,
        cvc2=_cvc2(field48) if field48 else None,
        pin_block=_pin_block(doc["52"]) if "52" in doc else None,
        original=original,
        replacement_amount=_field95(doc["95"]) if "95" in doc else None,
        raw=doc,
    )


def _card(doc: Mapping[str, str]) -> tuple[str, str | None, str | None]:
    """PAN, expiry and service code from fields 2, 14 and 35 (track 2 instead of 2 and 14)."""
    pan = doc.get("2")
    expiry = doc.get("14")
    if expiry is not None and not "01" <= expiry[2:] <= "12":
        raise FormatError(14, "expiry must be YYMM with month 01 to 12")
    track2_text = doc.get("35")
    if track2_text is None:
        assert pan is not None  # the mandatory check let the message through with 2 or 35
        return pan, expiry, None
    try:
        track2 = parse_track2(track2_text)
    except FieldError as error:
        raise FormatError(35, str(error)) from None
    if pan is not None and pan != track2.pan:
        raise FormatError(35, "track 2 PAN differs from field 2")
    if expiry is not None and expiry != track2.expiry_yymm:
        raise FormatError(14, "field 14 differs from the track 2 expiry")
    return track2.pan, track2.expiry_yymm, track2.service_code


def _billing(doc: Mapping[str, str]) -> tuple[int | None, str | None, str | None]:
    # Fields 6 and 51 only mean something together (docs/contract.md, wire profile: "when fields 6 and 51 are
    # present"); one without the other is a malformed message, not a hint to ignore.
    amount, numeric = doc.get("6"), doc.get("51")
    if amount is None and numeric is None:
        return None, None, None
    if numeric is None:
        raise FormatError(51, "billing currency missing while field 6 is present")
    if amount is None:
        raise FormatError(6, "billing amount missing while field 51 is present")
    known = currency.BY_NUMERIC.get(numeric)
    if known is None:
        raise FormatError(51, "unknown ISO 4217 currency code")
    return int(amount), numeric, known.alpha


# Valid MMDD and hhmm (the digits are checked already): one set lookup instead of two range tests.
_MONTH_DAYS = frozenset(f"{month:02d}{day:02d}" for month in range(1, 13) for day in range(1, 32))
_HOURS_MINUTES = frozenset(f"{hour:02d}{minute:02d}" for hour in range(24) for minute in range(60))


def _transmission_datetime(value: str) -> str:
    if not (value[0:4] in _MONTH_DAYS and value[4:8] in _HOURS_MINUTES and value[8:10] <= "59"):
        raise FormatError(7, "must be MMDDhhmmss")
    return value


def _local_time(value: str) -> str:
    if not (value[0:2] <= "23" and value[2:4] <= "59" and value[4:6] <= "59"):
        raise FormatError(12, "must be hhmmss")
    return value


def _local_date(value: str) -> str:
    if not ("01" <= value[0:2] <= "12" and "01" <= value[2:4] <= "31"):
        raise FormatError(13, "must be MMDD")
    return value


def _field48(value: str) -> dict[str, str]:
    try:
        return parse_field48(value)
    except FieldError as error:
        raise FormatError(48, str(error)) from None


def _cvc2(field48: dict[str, str]) -> str | None:
    value = field48.get(CVC2_SUBELEMENT)
    if value is not None and (len(value) != 3 or not is_digits(value)):
        raise FormatError(48, "subelement 92 (CVC2) must be 3 digits")
    return value


def _pin_block(value: str | bytes) -> bytes:
    if isinstance(value, str):  # a pyiso8583-style doc: binary fields as hex text
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise FormatError(52, "PIN block must be 8 bytes") from None
    if not isinstance(value, (bytes, bytearray)) or len(value) != PIN_BLOCK_SIZE:
        raise FormatError(52, "PIN block must be 8 bytes")
    return bytes(value)


def _field90(value: str) -> OriginalData:
    try:
        return parse_field90(value)
    except FieldError as error:
        raise FormatError(90, str(error)) from None


def _field95(value: str) -> int:
    try:
        return parse_field95(value)
    except FieldError as error:
        raise FormatError(95, str(error)) from None


# ---------------------------------------------------------------------------------------------
# Responses


def response_doc(req_raw: Mapping[str, str | bytes], mti: str, code: str) -> dict[str, str | bytes]:
    """A response: MTI `mti`, the request's echo fields (those it has), and field 39 = `code`.
    The caller adds 38, 44, 54 as the outcome requires."""
    assert len(mti) == 4 and mti[2] in "13579", "response MTIs have an odd third digit"
    assert len(code) == 2, "field 39 is 2 characters"
    doc: dict[str, str | bytes] = {"t": mti}
    for key in ECHO_FIELDS:
        value = req_raw.get(key)
        if value is not None:
            doc[key] = value
    doc["39"] = code
    return doc
