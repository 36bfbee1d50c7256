"""The clearing file (docs/contract.md, clearing file): one JSON object per line, decoded strictly at the edge.

A line that does not decode, or repeats a `recordId` already seen in the file, becomes an exception
of the run (reported with its line number, never with a full PAN) and posts nothing; the other lines
still apply. A record's identity (for "each record applies once", issue 6) is its RRN and the sha256
of its canonical JSON, so the same record sent again in a later file is recognised whatever the file.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from typing import Annotated

import attrs
import msgspec
from msgspec import Meta

from ledger.types import AMOUNT_MAX

CLEARING_FILE_BYTES_MAX = 64 * 1024 * 1024  # one upload or file; ~250k records of ~250 bytes
CLEARING_RECORDS_MAX = 1_000_000  # lines per file
RECORD_LINE_BYTES_MAX = 4_096
RECORD_ID_LENGTH_MAX = 64
RRN_LENGTH_MAX = 12  # field 37, an 12
AUTH_CODE_LENGTH_MAX = 6  # field 38, an 6
MERCHANT_NAME_LENGTH_MAX = 100
PAN_VISIBLE_FIRST = 6  # PCI DSS display rule: first 6 and last 4 at most
PAN_VISIBLE_LAST = 4


class RecordType(enum.StrEnum):
    purchase = "purchase"
    cash = "cash"
    refund = "refund"


Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
Amount = Annotated[int, Meta(ge=0, le=AMOUNT_MAX)]


class ClearingRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True, gc=False):
    record_id: Annotated[str, Meta(min_length=1, max_length=RECORD_ID_LENGTH_MAX)]
    type: RecordType
    rrn: Annotated[str, Meta(min_length=1, max_length=RRN_LENGTH_MAX)]
    auth_code: Annotated[str, Meta(max_length=AUTH_CODE_LENGTH_MAX)] = ""  # empty for a force post
    pan: Annotated[str, Meta(pattern=r"^[0-9]{12,19}$")]
    amount: Amount  # in `currency`, the transaction currency
    currency: Currency
    billing_amount: Amount  # in `billing_currency`: what the cardholder's balance is charged
    billing_currency: Currency
    mcc: Annotated[str, Meta(pattern=r"^[0-9]{4}$")]
    merchant_name: Annotated[str, Meta(max_length=MERCHANT_NAME_LENGTH_MAX)] = ""
    date: Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}")]


_record_decoder = msgspec.json.Decoder(ClearingRecord)
_loose_decoder = msgspec.json.Decoder(dict)
_encoder = msgspec.json.Encoder()


IDENTITY_DIGEST_CHARS = 64  # the sha256 that ends every identity, in hex


def record_identity(record: ClearingRecord) -> str:
    """`RRN:sha256` of the canonical JSON (fields in declaration order): equal records, equal identity.

    The sha256 alone makes the identity; the RRN in front orders the store's key by it. Networks
    hand out RRNs in time order, and a clearing file carries recent ones, so a chunk's rows go into
    a few neighbouring pages of the `clearing_records` key rather than one random page each: 1.4 KB
    written to the store per record against 7.0 KB with the digest alone, at 300k rows
    (docs/benchmarks.md, section 6). Stores written before carry digest-only identities
    (`legacy_identity`, ClearingStore.records)."""
    return f"{record.rrn}:{hashlib.sha256(_encoder.encode(record)).hexdigest()}"


def legacy_identity(identity: str) -> str:
    """The identity the same record had before identities began with the RRN: the digest alone."""
    return identity[-IDENTITY_DIGEST_CHARS:]


def mask_pan(pan: str) -> str:
    if len(pan) < PAN_VISIBLE_FIRST + PAN_VISIBLE_LAST + 1:
        return "*" * len(pan)
    return pan[:PAN_VISIBLE_FIRST] + "*" * (len(pan) - PAN_VISIBLE_FIRST - PAN_VISIBLE_LAST) + pan[-PAN_VISIBLE_LAST:]


class Line(msgspec.Struct, frozen=True, gc=False):
    """Untracked by the collector (as are its record and the plan structs): a clearing file is
    thousands of them, alive for its whole run, that each periodic collection would otherwise walk."""

    number: int  # 1-based line number in the file
    record: ClearingRecord
    identity: str


@attrs.frozen
class LineError:
    number: int
    record_id: str  # as far as it could be read ('' when not)
    masked_pan: str
    reason: str  # names the field and the rule, never a value


@attrs.frozen
class ClearingFile:
    sha256: str
    lines: tuple[Line, ...]
    errors: tuple[LineError, ...]


class ClearingFileError(Exception):
    """The file as a whole is refused (too large, too many lines): nothing is applied."""


PAUSE_EVERY_LINES = 16  # parse_clearing_file's `pause` runs this often (~0.25 ms of parsing)


def parse_clearing_file(data: bytes, *, pause: Callable[[], None] | None = None) -> ClearingFile:
    """`pause`, when given, runs every PAUSE_EVERY_LINES lines: in a worker thread of the server it
    hands the GIL back (engine.GilYield), so parsing does not hold up the event loop."""
    if len(data) > CLEARING_FILE_BYTES_MAX:
        raise ClearingFileError(f"clearing file larger than {CLEARING_FILE_BYTES_MAX} bytes")
    raw_lines = data.split(b"\n")
    if len(raw_lines) > CLEARING_RECORDS_MAX + 1:
        raise ClearingFileError(f"clearing file has more than {CLEARING_RECORDS_MAX} lines")
    lines: list[Line] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    for number, raw in enumerate(raw_lines, start=1):
        if pause is not None and number % PAUSE_EVERY_LINES == 0:
            pause()
        raw = raw.strip()
        if not raw:
            continue
        parsed = _parse_line(number, raw)
        if isinstance(parsed, LineError):
            errors.append(parsed)
        elif parsed.record.record_id in seen:
            errors.append(LineError(number, parsed.record.record_id, mask_pan(parsed.record.pan),
                                    "recordId repeated in the file"))
        else:
            seen.add(parsed.record.record_id)
            lines.append(parsed)
    return ClearingFile(hashlib.sha256(data).hexdigest(), tuple(lines), tuple(errors))


def _parse_line(number: int, raw: bytes) -> Line | LineError:
    if len(raw) > RECORD_LINE_BYTES_MAX:
        return LineError(number, "", "", f"line longer than {RECORD_LINE_BYTES_MAX} bytes")
    try:
        record = _record_decoder.decode(raw)
    except msgspec.DecodeError as error:
        # msgspec names the path and the rule, not the value: safe to report (no card data).
        record_id, masked = _salvage(raw)
        return LineError(number, record_id, masked, f"invalid record: {error}")
    return Line(number, record, record_identity(record))


def _salvage(raw: bytes) -> tuple[str, str]:
    """recordId and masked PAN of a line that failed strict decoding, for the exception list."""
    try:
        loose = _loose_decoder.decode(raw)
    except msgspec.DecodeError:
        return "", ""
    record_id = loose.get("recordId")
    pan = loose.get("pan")
    record_id = record_id[:RECORD_ID_LENGTH_MAX] if isinstance(record_id, str) else ""
    masked = mask_pan(pan) if isinstance(pan, str) and pan.isdigit() else ""
    return record_id, masked
