"""ISO 8583:1987 codec for the wire profile of docs/contract.md, wire profile, on top of pyiso8583.

The profile is `iso8583.specs.default`: ASCII MTI, binary primary and secondary bitmaps, ASCII
fields, ASCII LL/LLL prefixes. SPEC is a private deep copy, identical to it, so nothing else in the
process can change our wire format by mutating the library's module-level dict.

A decoded message ("doc") is a dict keyed by field number as a string, plus "t" for the MTI:
- text fields are `str`, exactly as on the wire (no trimming);
- binary fields (52 PIN block, 55, 64/128 MAC, 96) are `bytes`, e.g. field 52 is the 8 raw bytes
  of the encrypted PIN block;
- the bitmaps ("p", "1") are left out: they are a wire detail and `encode` recomputes them.
`encode` accepts the same shape (binary fields as bytes or as hex strings) and never mutates the
dict it is given, so `encode(decode(raw)) == raw` for every message of this profile.

Speed: pyiso8583 is a general codec (any spec, any encoding) and costs 20-40 us per message each
way. `decode` and `encode` first try a small table-driven walk of SPEC that handles only what this
profile uses and costs a few microseconds (each layout, the bitmaps or a doc's keys in order, is
worked out once and remembered: a network sends a few dozen); anything it does not like (a
truncated field, non-ASCII data, a tertiary bitmap, a value too long) is handed to pyiso8583,
whose verdict is final. So
pyiso8583 decides every error and the fast path only ever returns what pyiso8583 would; the tests
check the two against each other on random messages and random bytes.

Errors never carry field values: pyiso8583's messages only state lengths and positions, and we
raise ours `from None` so the library's exception (which holds the raw bytes and the partially
decoded dict, PAN included) is not chained onto ours.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import iso8583
import iso8583.specs

SPEC: dict[str, dict[str, object]] = copy.deepcopy(iso8583.specs.default)

BITMAP_KEYS = ("p", "1")
# Binary fields other than the bitmaps: bytes in our docs, upper-case hex in pyiso8583's.
BINARY_FIELDS: frozenset[str] = frozenset(
    key for key, spec in SPEC.items() if spec["data_enc"] == "b" and key not in BITMAP_KEYS
)
# Fields that carry card data; named so that callers can drop them before logging a partial doc.
SENSITIVE_FIELDS: frozenset[str] = frozenset({"2", "14", "35", "45", "52", "55"})

MTI_SIZE = 4
BITMAP_SIZE = 8
FIELD_NUMBER_MAX = 128
TERTIARY_BITMAP_FIELD = 65  # pyiso8583 reads bit 65 as "a tertiary bitmap follows"

Doc = dict[str, "str | bytes"]


class IsoDecodeError(ValueError):
    """The bytes are not a message of this profile.

    `field` is where decoding failed ("t" MTI, "p"/"1" bitmaps, or a field number as a string) and
    `reason` says why, in terms of lengths and positions only. `partial` holds the fields decoded
    before the failure (bitmaps and the failing field left out), so a caller can still answer with
    a format error when the MTI, field 11 and field 37 came through. `partial` may hold card data:
    never log it whole.
    """

    def __init__(self, field: str, reason: str, partial: Doc | None = None) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason
        self.partial: Doc = partial if partial is not None else {}

    def __str__(self) -> str:
        return f"cannot decode ISO 8583 field {self.field}: {self.reason}"


class IsoEncodeError(ValueError):
    """A doc cannot be encoded in this profile (a bug in whoever built it). Carries no values."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot encode ISO 8583 field {self.field}: {self.reason}"


# --------------------------------------------------------------------------------------------
# The fast path's view of SPEC: per field number, (key, length-prefix digits, size max, binary).


def _field_table() -> list[tuple[str, int, int, bool] | None]:
    table: list[tuple[str, int, int, bool] | None] = [None, None]  # no field 0; 1 is a bitmap
    for number in range(2, FIELD_NUMBER_MAX + 1):
        spec = SPEC[str(number)]
        supported = (
            spec["len_enc"] == "ascii"
            and spec["data_enc"] in ("ascii", "b")
            and spec["len_type"] in (0, 2, 3)
            and spec.get("len_count", "bytes") == "bytes"
            and number != TERTIARY_BITMAP_FIELD
        )
        # An unsupported field is left to pyiso8583 (None sends every message using it there).
        len_type, size_max = int(spec["len_type"]), int(spec["max_len"])  # type: ignore
        binary = spec["data_enc"] == "b"
        table.append((str(number), len_type, size_max, binary) if supported else None)
    return table


_FIELDS = _field_table()
_NUMBER_OF_KEY = {entry[0]: number for number, entry in enumerate(_FIELDS) if entry is not None}
_FAST_PATH = (
    SPEC["h"]["max_len"] == 0
    and SPEC["t"]["data_enc"] == "ascii"
    and SPEC["p"]["data_enc"] == "b"
    and SPEC["1"]["data_enc"] == "b"
    and SPEC["p"]["max_len"] == SPEC["1"]["max_len"] == BITMAP_SIZE
)
_LENGTH_PREFIX = {2: b"%02d", 3: b"%03d"}
# Length prefixes as text, both ways: an exact table lookup replaces isdigit() + int() and "%02d",
# and accepts nothing but ASCII digits of the right count.
_PREFIX_SIZE = {n: {f"{size:0{n}d}": size for size in range(10**n)} for n in (2, 3)}
_PREFIX_TEXT = {n: tuple(f"{size:0{n}d}" for size in range(10**n)) for n in (2, 3)}
# Layouts seen (the bitmaps when decoding, the doc's keys in order when encoding) -> the fields to
# walk. A network sends a few dozen layouts; past this bound a new one is worked out every time.
LAYOUTS_CACHED_MAX = 4096

_Entry = tuple[str, int, int, bool]  # key, length-prefix digits, size max, binary


class _Irregular(Exception):
    """The fast path stepped out of its lane: let pyiso8583 handle the message."""


_decode_layouts: dict[bytes, tuple[_Entry, ...]] = {}


def _decode_layout(bitmaps: bytes) -> tuple[_Entry, ...]:
    """The fields the bitmaps announce, in wire order."""
    layout = _decode_layouts.get(bitmaps)
    if layout is not None:
        return layout
    bits = int.from_bytes(bitmaps, "big")
    if len(bitmaps) == BITMAP_SIZE:
        bits <<= 64
    bits &= (1 << 127) - 1  # bit 1 announced the secondary bitmap
    entries = []
    while bits:  # one pass per field present: at most 127
        number = 129 - bits.bit_length()  # lowest field number still present
        bits ^= 1 << (128 - number)
        entry = _FIELDS[number]
        if entry is None:
            raise _Irregular
        entries.append(entry)
    layout = tuple(entries)
    if len(_decode_layouts) < LAYOUTS_CACHED_MAX:
        _decode_layouts[bitmaps] = layout
    return layout


def _decode_fast(raw: bytes) -> Doc:
    size_total = len(raw)
    offset = MTI_SIZE + BITMAP_SIZE
    if size_total < offset:
        raise _Irregular
    if raw[MTI_SIZE] & 0x80:  # bit 1: a secondary bitmap follows
        offset += BITMAP_SIZE
        if size_total < offset:
            raise _Irregular
    # Text is sliced from one latin-1 view of the whole message (latin-1 maps every byte to one
    # character, so offsets agree); that it is all ASCII is checked once, at the end, on the bytes.
    text = raw.decode("latin-1")
    doc: Doc = {"t": text[:MTI_SIZE]}
    text_from = offset  # the next stretch of text (prefixes, text fields) starts here
    ascii_ = raw[:MTI_SIZE].isascii()
    for key, len_type, size, binary in _decode_layout(raw[MTI_SIZE:offset]):
        if len_type:
            end = offset + len_type
            size_sent = _PREFIX_SIZE[len_type].get(text[offset:end])
            if size_sent is None or size_sent > size:
                raise _Irregular
            offset, size = end, size_sent
        end = offset + size
        if end > size_total:
            raise _Irregular
        if binary:
            doc[key] = raw[offset:end]
            ascii_ = ascii_ and raw[text_from:offset].isascii()
            text_from = end
        else:
            doc[key] = text[offset:end]
        offset = end
    if offset != size_total or not (ascii_ and raw[text_from:].isascii()):
        raise _Irregular
    return doc


_encode_layouts: dict[tuple, tuple[bytes, tuple[_Entry, ...], bool]] = {}


def _encode_layout(keys: tuple) -> tuple[bytes, tuple[_Entry, ...], bool]:
    """For a doc's keys: the bitmaps, the fields in wire order, and whether any is binary."""
    layout = _encode_layouts.get(keys)
    if layout is not None:
        return layout
    numbers = []
    bits = 0
    for key in keys:
        number = _NUMBER_OF_KEY.get(key)
        if number is None:
            if key == "t" or key in BITMAP_KEYS:
                continue
            raise _Irregular
        bits |= 1 << (128 - number)
        numbers.append(number)
    numbers.sort()
    if bits & ((1 << 64) - 1):
        bitmaps = (bits | (1 << 127)).to_bytes(2 * BITMAP_SIZE, "big")
    else:
        bitmaps = (bits >> 64).to_bytes(BITMAP_SIZE, "big")
    entries = tuple(_FIELDS[number] for number in numbers)
    layout = (bitmaps, entries, any(entry[3] for entry in entries))  # type: ignore[index]
    if len(_encode_layouts) < LAYOUTS_CACHED_MAX:
        _encode_layouts[keys] = layout
    return layout  # type: ignore[return-value]


def _encode_fast(doc: Mapping[str, str | bytes]) -> bytes:
    mti = doc["t"]
    if mti.__class__ is not str or len(mti) != MTI_SIZE:
        raise _Irregular
    bitmaps, entries, has_binary = _encode_layout(tuple(doc))
    if has_binary:
        return mti.encode("ascii") + bitmaps + _encode_fields(doc, entries)
    # Text only (every response): one str, encoded once; a non-ASCII value fails the encode.
    parts = []
    append = parts.append
    for key, len_type, size_max, _ in entries:
        value = doc[key]
        if value.__class__ is not str:
            raise _Irregular
        size = len(value)
        if len_type == 0:
            if size != size_max:
                raise _Irregular
        elif size > size_max:
            raise _Irregular
        else:
            append(_PREFIX_TEXT[len_type][size])
        append(value)
    return mti.encode("ascii") + bitmaps + "".join(parts).encode("ascii")  # type: ignore[arg-type]


def _encode_fields(doc: Mapping[str, str | bytes], entries: tuple[_Entry, ...]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    for key, len_type, size_max, binary in entries:
        value = doc[key]
        if binary:
            data = value if value.__class__ is bytes else bytes.fromhex(value)  # type: ignore
        elif value.__class__ is str:
            data = value.encode("ascii")  # type: ignore[union-attr]
        else:
            raise _Irregular
        size = len(data)
        if len_type == 0:
            if size != size_max:
                raise _Irregular
        elif size > size_max:
            raise _Irregular
        else:
            append(_LENGTH_PREFIX[len_type] % size)
        append(data)  # type: ignore[arg-type]
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# Public codec


def _binary_to_bytes(doc: dict[str, str]) -> Doc:
    out: Doc = dict(doc)  # type: ignore[arg-type]
    for key in BITMAP_KEYS:
        out.pop(key, None)
    for key in BINARY_FIELDS.intersection(out):
        out[key] = bytes.fromhex(doc[key])
    return out


def _decode_slow(raw: bytes) -> Doc:
    try:
        doc, _ = iso8583.decode(raw, SPEC)
    except iso8583.DecodeError as error:
        partial = {key: value for key, value in error.doc_dec.items() if key != error.field}
        raise IsoDecodeError(error.field, error.msg, _binary_to_bytes(partial)) from None
    except KeyError:
        # A bit for a field the profile does not define (129-192, the tertiary bitmap's range).
        raise IsoDecodeError("1", "bitmap names a field outside the profile (above 128)") from None
    return _binary_to_bytes(doc)


def decode(raw: bytes) -> Doc:
    """Decode one message (a frame's payload). Raises IsoDecodeError, and nothing else, for any
    bytes input (bytearray and memoryview are copied to bytes first)."""
    if raw.__class__ is not bytes:
        raw = bytes(raw)
    if _FAST_PATH:
        try:
            return _decode_fast(raw)
        except (_Irregular, ValueError):
            pass
    return _decode_slow(raw)


def _encode_slow(doc: Mapping[str, str | bytes]) -> bytes:
    wire: dict[str, str] = {}
    for key, value in doc.items():
        if key in BITMAP_KEYS:
            continue  # recomputed from the fields present
        if key not in SPEC or key == "h":
            raise IsoEncodeError(str(key), "field not defined in the profile")
        if isinstance(value, (bytes, bytearray)):
            if key not in BINARY_FIELDS:
                raise IsoEncodeError(key, "bytes given for a text field")
            wire[key] = value.hex().upper()
        else:
            wire[key] = value
    try:
        raw, _ = iso8583.encode(wire, SPEC)
    except iso8583.EncodeError as error:
        raise IsoEncodeError(error.field, error.msg) from None
    return bytes(raw)


def encode(doc: Mapping[str, str | bytes]) -> bytes:
    """Encode one message (without framing). The caller's dict is left untouched."""
    if _FAST_PATH and "t" in doc:
        try:
            return _encode_fast(doc)
        except (_Irregular, ValueError, TypeError, AttributeError):
            pass
    return _encode_slow(doc)
