"""Foreign exchange: the rates table `DIR/fx-rates.json` and conversion to the balance currency.

When an authorization carries no billing fields (6/51) and its currency (field 49) is not the
balance's, the amount is converted here (issue 6, "FX"). The table is one JSON object:

    {"base": "EUR", "rates": {"USD": "1.0842", "GBP": "0.8571"}, "asOf": "2025-01-02T16:00:00Z"}

`rates[C]` is how many units of C one unit of `base` buys. A pair without the base is crossed
through it (USD -> GBP = rates[GBP] / rates[USD]). Rates are decimal strings and every step is
exact rational arithmetic (`fractions.Fraction`); only the result is rounded, half-up, to the
minor unit of the target currency (authsrv/iso/currency.py exponents).

The file is replaced atomically (write, fsync, rename, fsync the directory: `write_rates`), so a
reader sees the old table or the new one. `RatesFile` re-reads it when its identity changes (inode,
size, mtime): one `stat` per conversion, so a replacement by `PUT /admin/fx-rates` (or by hand)
is seen by the very next authorization without any wiring between the REST side and the switch.
"""

from __future__ import annotations

import datetime
import logging
import os
from fractions import Fraction
from pathlib import Path

import attrs
import msgspec

from authsrv.iso import currency

log = logging.getLogger("authsrv.fx")

RATES_FILE_NAME = "fx-rates.json"
RATES_MAX = 400  # ISO 4217 has fewer than 200 active codes: a bigger table is a mistake
RATES_FILE_BYTES_MAX = 64 * 1024
RATE_TEXT_LENGTH_MAX = 24  # "123456.123456789012" and the like; no exponents
RATE_MAX = Fraction(10**9)  # a unit of the base never buys more than this of another currency
RATE_DIGITS_RECORDED = 12  # significant digits of the rate kept in the journal record


class RatesError(ValueError):
    """The rates document is malformed; the message names the rule, never more than a code."""


class RatesDocument(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    """The wire and file format (also the body of `PUT /admin/fx-rates`)."""

    base: str
    rates: dict[str, str]
    as_of: str


@attrs.frozen
class Conversion:
    amount: int  # in the target currency's minor units, rounded half-up
    rate: str  # target units per source unit, RATE_DIGITS_RECORDED significant digits


@attrs.frozen
class RatesTable:
    base: str
    rates: dict[str, Fraction]  # currency -> units per one unit of base (base itself: 1)
    as_of: str
    document: RatesDocument

    @classmethod
    def empty(cls) -> RatesTable:
        return cls("", {}, "", RatesDocument(base="", rates={}, as_of=""))

    def rate(self, source: str, target: str) -> Fraction | None:
        """Units of `target` per unit of `source`; None when either is missing."""
        source_rate, target_rate = self.rates.get(source), self.rates.get(target)
        if source_rate is None or target_rate is None:
            return None
        return target_rate / source_rate

    def convert(self, amount: int, source: str, target: str) -> Conversion | None:
        rate = self.rate(source, target)
        if rate is None:
            return None
        return Conversion(convert_minor(amount, source, target, rate), format_rate(rate))


def convert_minor(amount: int, source: str, target: str, rate: Fraction) -> int:
    """amount (source minor units) -> target minor units, exactly, rounded half-up once."""
    assert amount >= 0 and rate > 0
    value = Fraction(amount) * rate * Fraction(10) ** (currency.exponent(target) - currency.exponent(source))
    converted = (value.numerator * 2 + value.denominator) // (value.denominator * 2)  # half-up, value >= 0
    assert converted >= 0
    return converted


def format_rate(rate: Fraction) -> str:
    """A decimal string with RATE_DIGITS_RECORDED significant digits (what the journal keeps)."""
    assert rate > 0
    digits = 0
    scaled = rate
    while scaled >= 10:  # bounded: a cross rate is within RATE_MAX ** 2 and its inverse
        scaled /= 10
        digits += 1
    while scaled < 1:
        scaled *= 10
        digits -= 1
    decimals = max(0, RATE_DIGITS_RECORDED - 1 - digits)
    unit = 10**decimals
    rounded = int((rate * unit * 2 + 1) // 2)
    text = f"{rounded // unit}" if decimals == 0 else f"{rounded // unit}.{rounded % unit:0{decimals}d}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _parse_rate(text: str, code: str) -> Fraction:
    if not text or len(text) > RATE_TEXT_LENGTH_MAX or text.count(".") > 1:
        raise RatesError(f"rate of {code} must be a decimal string of at most {RATE_TEXT_LENGTH_MAX} characters")
    if not text.replace(".", "", 1).isdigit() or not text.isascii() or text.startswith(".") or text.endswith("."):
        raise RatesError(f"rate of {code} must be digits with at most one decimal point")
    rate = Fraction(text)
    if not 1 / RATE_MAX <= rate <= RATE_MAX:
        raise RatesError(f"rate of {code} must be between 1e-9 and 1e9")
    return rate


def _check_code(code: str) -> None:
    known = currency.by_alpha(code) if isinstance(code, str) else None
    if known is None or known.exponent is None:
        raise RatesError(f"{code[:8]!r} is not an ISO 4217 currency with a minor unit")


def _check_as_of(text: str) -> None:
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RatesError("asOf must be an ISO 8601 date-time") from None
    if moment.tzinfo is None or moment.utcoffset() != datetime.timedelta(0):
        raise RatesError("asOf must be in UTC (end it with Z)")


def table_of(document: RatesDocument) -> RatesTable:
    """Validate a decoded document into a table (RatesError names what is wrong)."""
    _check_code(document.base)
    _check_as_of(document.as_of)
    if len(document.rates) > RATES_MAX:
        raise RatesError(f"more than {RATES_MAX} rates")
    rates: dict[str, Fraction] = {}
    for code, text in document.rates.items():
        _check_code(code)
        rates[code] = _parse_rate(text, code)
    if rates.setdefault(document.base, Fraction(1)) != 1:
        raise RatesError("the base currency's own rate must be 1")
    return RatesTable(document.base, rates, document.as_of, document)


_document_decoder = msgspec.json.Decoder(RatesDocument)
_encoder = msgspec.json.Encoder()


def decode_rates(data: bytes) -> RatesTable:
    if len(data) > RATES_FILE_BYTES_MAX:
        raise RatesError(f"larger than {RATES_FILE_BYTES_MAX} bytes")
    try:
        document = _document_decoder.decode(data)
    except msgspec.DecodeError as error:
        raise RatesError(str(error)) from None
    return table_of(document)


def encode_rates(table: RatesTable) -> bytes:
    return _encoder.encode(table.document)


def write_rates(path: Path, table: RatesTable) -> None:
    """Replace the file atomically: a reader (or a crash) sees the old table or the new one."""
    data = encode_rates(table)
    assert decode_rates(data) == table  # what is written reads back as the same table
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


# path -> replacements made by this process. File timestamps are kernel-tick coarse and a freed
# inode number can come back, so two quick replacements of equal size could look identical by
# `stat` alone; in-process replacements (PUT /admin/fx-rates) bump this, which every reader checks.
_generations: dict[str, int] = {}


class RatesFile:
    """The current table of `path`, re-read when the file is replaced. A missing file is an empty
    table (every conversion declines 57); an unreadable or invalid replacement keeps the last good
    table and is logged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key = os.path.abspath(self.path)
        self._identity: tuple[int, int, int, int] | None = None
        self._table = RatesTable.empty()
        self.conversions = 0  # counted here so tests and metrics need no other collaborator
        self.advices_without_rate = 0
        self.declines_without_rate = 0

    def table(self) -> RatesTable:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._identity, self._table = None, RatesTable.empty()
            return self._table
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns, _generations.get(self._key, 0))
        if identity != self._identity:
            self._reload(identity)
        return self._table

    def _reload(self, identity: tuple[int, int, int, int]) -> None:
        try:
            self._table = decode_rates(self.path.read_bytes())
        except (OSError, RatesError) as error:
            log.error("%s not loaded, keeping the previous table: %s", self.path, error)
        self._identity = identity  # a bad file is reported once, not on every authorization

    def replace(self, table: RatesTable) -> None:
        """Write `table` (atomically) and use it at once."""
        write_rates(self.path, table)
        _generations[self._key] = _generations.get(self._key, 0) + 1
        self.table()
