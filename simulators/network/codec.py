"""ISO 8583 framing and codec of the network simulator (docs/contract.md, wire profile).

The simulator is an independent peer of the server: it never imports `authsrv.iso`. The field table
is read from pyiso8583's `iso8583.specs.default`, which is the contract's wire profile. The small
hand-written encoder and decoder below walk that table directly: an 0100 round trip (encode +
decode) costs about 22 us against about 95 us through pyiso8583's general codec on this machine,
so the load generator does not become the bottleneck it measures. `Codec.pyiso8583` uses pyiso8583
itself; the tests prove both produce the same bytes and the same decoded fields.

A message is a dict in pyiso8583's decoded form: key `"t"` is the MTI, keys `"2"`..`"128"` are
fields, every value is a `str` (binary fields such as 52 as upper-case hex, as pyiso8583 does).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from typing import NamedTuple

import iso8583
import iso8583.specs

SPEC = iso8583.specs.default
LENGTH_HEADER_SIZE = 2  # bytes, big-endian unsigned (docs/contract.md, wire profile)
FRAME_SIZE_MAX = 8192  # bytes after the header; our requests are under 300 bytes
FIELD_NUMBER_MAX = 128
MTI_SIZE = 4
BITMAP_SIZE = 8

Message = dict[str, str]


class Codec(enum.Enum):
    fast = "fast"
    pyiso8583 = "pyiso8583"


class FramingError(Exception):
    """The byte stream no longer splits into frames: the connection must be closed."""


class EncodeError(ValueError):
    """A message the simulator built does not fit the wire profile (a simulator bug)."""


class DecodeError(ValueError):
    """A frame that is not a valid message under the wire profile."""


def _field_formats() -> dict[int, tuple[int, int, bool]]:
    """(length digits: 0 fixed / 2 LL / 3 LLL, size max in bytes, binary) per field number."""
    formats = {}
    for number in range(2, FIELD_NUMBER_MAX + 1):
        spec = SPEC[str(number)]
        # The hand codec supports only what the contract's profile uses: ASCII lengths, ASCII or
        # binary data. Fail at import, not on the wire, if the spec ever changes under us.
        assert spec["len_enc"] == "ascii", number
        assert spec["data_enc"] in ("ascii", "b"), number
        assert spec["len_type"] in (0, 2, 3), number
        formats[number] = (spec["len_type"], spec["max_len"], spec["data_enc"] == "b")
    assert SPEC["p"]["data_enc"] == "b" and SPEC["p"]["max_len"] == BITMAP_SIZE
    assert SPEC["1"]["data_enc"] == "b" and SPEC["1"]["max_len"] == BITMAP_SIZE
    assert SPEC["h"]["max_len"] == 0  # no message header in the default profile
    return formats


FIELD_FORMATS = _field_formats()
_KEY_OF_NUMBER = {number: str(number) for number in FIELD_FORMATS}
_NUMBER_OF_KEY = {str(number): number for number in FIELD_FORMATS}
_NOT_FIELDS = frozenset({"t", "p", "1"})  # MTI and bitmaps: computed, not copied


def frame(payload: bytes) -> bytes:
    """Prefix one encoded message with its 2-byte big-endian length."""
    assert 0 < len(payload) <= FRAME_SIZE_MAX, len(payload)
    return len(payload).to_bytes(LENGTH_HEADER_SIZE, "big") + payload


class FrameReader:
    """Splits a received byte stream into frames; keeps the partial tail between calls."""

    def __init__(self, frame_size_max: int = FRAME_SIZE_MAX) -> None:
        assert 0 < frame_size_max <= 0xFFFF
        self._frame_size_max = frame_size_max
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        available = len(buffer)
        while available - offset >= LENGTH_HEADER_SIZE:
            size = (buffer[offset] << 8) | buffer[offset + 1]
            if size == 0 or size > self._frame_size_max:
                raise FramingError(f"frame length {size} outside 1..{self._frame_size_max}")
            end = offset + LENGTH_HEADER_SIZE + size
            if end > available:
                break
            frames.append(bytes(buffer[offset + LENGTH_HEADER_SIZE : end]))
            offset = end
        del buffer[:offset]
        assert len(buffer) < LENGTH_HEADER_SIZE + self._frame_size_max
        return frames


def encode(message: Message, codec: Codec = Codec.fast) -> bytes:
    if codec is Codec.fast:
        return encode_fast(message)
    try:
        raw, _ = iso8583.encode(dict(message), SPEC)
    except iso8583.EncodeError as error:
        raise EncodeError(str(error)) from None
    return bytes(raw)


def decode(payload: bytes, codec: Codec = Codec.fast) -> Message:
    if codec is Codec.fast:
        return decode_fast(payload)
    try:
        message, _ = iso8583.decode(payload, SPEC)
    except iso8583.DecodeError as error:
        raise DecodeError(str(error)) from None
    return message


def encode_fast(message: Message) -> bytes:
    """pyiso8583's bytes for `message`, through a layout cached per key order (the builders of the
    mix produce a few dozen), so a message costs a handful of C-level joins instead of a loop per
    field. Anything the fast path does not like is re-encoded by `encode_checked`, which raises the
    precise EncodeError (or, never in practice, succeeds: both implement the same rules)."""
    shape = _SHAPES.get(tuple(message))
    if shape is None:
        shape = _shape_of(tuple(message))
        if shape is None:
            return encode_checked(message)
    mti = message["t"]
    if len(mti) != MTI_SIZE or not mti.isdigit():
        return encode_checked(message)
    values = list(shape.values(message))
    sizes = list(map(len, values))
    if shape.fixed_sizes_of(sizes) != shape.fixed_sizes or not "".join(values).isascii():
        return encode_checked(message)
    for position, digits, size_max in shape.variable:  # bounded: the variable fields of the layout
        size = sizes[position]
        if size > size_max:
            return encode_checked(message)
        values[position] = "%0*d%s" % (digits, size, values[position])
    for position, digits, size_max in shape.binary:  # field 52 in ATM and PIN traffic
        try:
            data = bytes.fromhex(values[position])
        except ValueError:
            return encode_checked(message)
        if (len(data) != size_max) if digits == 0 else (len(data) > size_max):
            return encode_checked(message)
        # Latin-1 maps bytes 0..255 to code points 0..255 and back: the join below carries them.
        values[position] = ("%0*d" % (digits, len(data)) if digits else "") + data.decode("latin-1")
    return mti.encode("ascii") + shape.bitmap + "".join(values).encode("latin-1")


class _Shape(NamedTuple):
    """How to encode every message with one key order: its fields by number, bitmap, length rules."""

    values: Callable[[Message], tuple[str, ...]]  # the field values in field-number order
    bitmap: bytes
    fixed_sizes_of: Callable[[list[int]], tuple[int, ...]]  # sizes of the fixed-length text fields
    fixed_sizes: tuple[int, ...]
    variable: tuple[tuple[int, int, int], ...]  # text fields: (position, length digits, size max)
    binary: tuple[tuple[int, int, int], ...]  # binary fields, as hex text: (position, length digits, size max)


SHAPES_MAX = 1_024  # key orders remembered; others are encoded through the checked path
_SHAPES: dict[tuple[str, ...], _Shape] = {}


def _shape_of(keys: tuple[str, ...]) -> _Shape | None:
    """The layout for messages with these keys, cached while SHAPES_MAX allows; None: invalid keys."""
    if "t" not in keys or any(key not in _NUMBER_OF_KEY and key not in _NOT_FIELDS for key in keys):
        return None
    numbers = sorted(_NUMBER_OF_KEY[key] for key in keys if key not in _NOT_FIELDS)
    if not numbers:
        return None
    bits = 1 << 127 if numbers[-1] > 64 else 0
    fixed, fixed_sizes, variable, binary = [], [], [], []
    for position, number in enumerate(numbers):
        bits |= 1 << (128 - number)
        len_type, size_max, is_binary = FIELD_FORMATS[number]
        if is_binary:
            binary.append((position, len_type, size_max))
        elif len_type == 0:
            fixed.append(position)
            fixed_sizes.append(size_max)
        else:
            variable.append((position, len_type, size_max))
    field_keys = [_KEY_OF_NUMBER[number] for number in numbers]
    shape = _Shape(
        values=_getter(field_keys),
        bitmap=bits.to_bytes(16, "big") if numbers[-1] > 64 else (bits >> 64).to_bytes(8, "big"),
        fixed_sizes_of=_getter(fixed),
        fixed_sizes=tuple(fixed_sizes),
        variable=tuple(variable),
        binary=tuple(binary),
    )
    if len(_SHAPES) < SHAPES_MAX:
        _SHAPES[keys] = shape
    return shape


def _getter(items: list) -> Callable:
    """operator.itemgetter that always returns a tuple (it returns a bare item for one key)."""
    if len(items) == 1:
        only = items[0]
        return lambda container: (container[only],)
    return operator.itemgetter(*items) if items else (lambda container: ())


def encode_checked(message: Message) -> bytes:
    """The field-by-field encoder: slower, names the field a message breaks the profile on."""
    mti = message["t"]
    if len(mti) != MTI_SIZE or not mti.isdigit():
        raise EncodeError(f"MTI {mti!r} is not 4 digits")
    try:
        numbers = sorted(_NUMBER_OF_KEY[key] for key in message if key not in _NOT_FIELDS)
    except KeyError as error:
        raise EncodeError(f"no field {error}") from None
    if not numbers:
        raise EncodeError("a message needs at least one field")
    secondary = numbers[-1] > 64
    bits = 1 << 127 if secondary else 0
    parts = []
    append = parts.append
    for number in numbers:  # inlined per field: this is the load generator's hot loop
        bits |= 1 << (128 - number)
        len_type, size_max, binary = FIELD_FORMATS[number]
        value = message[_KEY_OF_NUMBER[number]]
        try:
            data = bytes.fromhex(value) if binary else value.encode("ascii")
        except (ValueError, UnicodeEncodeError):
            raise EncodeError(f"field {number}: not {'hex' if binary else 'ASCII'}") from None
        size = len(data)
        if len_type == 0:
            if size != size_max:
                raise EncodeError(f"field {number}: {size} bytes, fixed size is {size_max}")
        elif size > size_max:
            raise EncodeError(f"field {number}: {size} bytes, max {size_max}")
        else:
            append(b"%0*d" % (len_type, size))
        append(data)
    bitmap = bits.to_bytes(16, "big") if secondary else (bits >> 64).to_bytes(8, "big")
    return mti.encode("ascii") + bitmap + b"".join(parts)


def decode_fast(payload: bytes) -> Message:
    size_total = len(payload)
    if size_total < MTI_SIZE + BITMAP_SIZE:
        raise DecodeError(f"frame of {size_total} bytes is shorter than MTI and bitmap")
    mti_bytes = payload[:MTI_SIZE]
    if not mti_bytes.isdigit():
        raise DecodeError("MTI is not 4 digits")
    offset = MTI_SIZE + BITMAP_SIZE
    primary = payload[MTI_SIZE:offset]
    message = {"t": mti_bytes.decode("ascii"), "p": primary.hex().upper()}
    bits = int.from_bytes(primary, "big") << 64
    if bits >> 127:
        secondary = payload[offset : offset + BITMAP_SIZE]
        if len(secondary) != BITMAP_SIZE:
            raise DecodeError("secondary bitmap truncated")
        message["1"] = secondary.hex().upper()
        bits |= int.from_bytes(secondary, "big")
        offset += BITMAP_SIZE
    bits &= (1 << 127) - 1  # bit 1 is the secondary bitmap itself, handled above
    while bits:  # bounded: one pass per bit set, at most 127
        number = 129 - bits.bit_length()  # lowest field number still present
        bits ^= 1 << (128 - number)
        len_type, size, binary = FIELD_FORMATS[number]
        if len_type:
            digits = payload[offset : offset + len_type]
            if len(digits) != len_type or not digits.isdigit():
                raise DecodeError(f"field {number}: bad length prefix")
            offset += len_type
            size_max, size = size, int(digits)
            if size > size_max:
                raise DecodeError(f"field {number}: {size} bytes, max {size_max}")
        end = offset + size
        if end > size_total:
            raise DecodeError(f"field {number}: truncated")
        data = payload[offset:end]
        if binary:
            message[_KEY_OF_NUMBER[number]] = data.hex().upper()
        elif data.isascii():
            message[_KEY_OF_NUMBER[number]] = data.decode("ascii")
        else:
            raise DecodeError(f"field {number}: not ASCII")
        offset = end
    if offset != size_total:
        raise DecodeError(f"{size_total - offset} bytes after the last field")
    return message


class Reply(NamedTuple):
    """What the load generator reads from a response: MTI and fields 11, 37, 38, 39 ("" if absent)."""

    mti: str
    stan: str
    rrn: str
    auth_code: str
    code: str


_REPLY_FIELDS = (11, 37, 38, 39)  # Reply's slots after the MTI, in this order


class _Segment(NamedTuple):
    """A run of fixed-length text fields merged into one span, or one variable-length field."""

    length_digits: int  # 0: fixed span
    size: int  # bytes of a fixed span; size max of a variable field
    wanted: tuple[tuple[int, int, int], ...]  # (Reply slot, offset in the span, size)


LAYOUTS_MAX = 1_024  # bitmaps remembered by decode_reply
_LAYOUTS: dict[bytes, tuple[_Segment, ...] | None] = {}


def _layout_of(bitmap: bytes) -> tuple[_Segment, ...] | None:
    """The segments of a message with this bitmap (primary, or primary + secondary); None when it
    has a binary field, which decode_reply leaves to the full decoder."""
    bits = int.from_bytes(bitmap, "big") << (128 - 8 * len(bitmap))
    segments: list[_Segment] = []
    span, wanted = 0, []
    for number in range(2, FIELD_NUMBER_MAX + 1):  # bounded: 127 fields
        if not bits >> (128 - number) & 1:
            continue
        len_type, size, binary = FIELD_FORMATS[number]
        if binary:
            return None
        if len_type:
            if span:
                segments.append(_Segment(0, span, tuple(wanted)))
                span, wanted = 0, []
            segments.append(_Segment(len_type, size, ()))
            continue
        if number in _REPLY_FIELDS:
            wanted.append((1 + _REPLY_FIELDS.index(number), span, size))
        span += size
    if span:
        segments.append(_Segment(0, span, tuple(wanted)))
    return tuple(segments)


def _reply_fields_are_fixed_text() -> None:
    for number in _REPLY_FIELDS:  # _layout_of reads them only inside fixed spans
        assert FIELD_FORMATS[number][0] == 0 and not FIELD_FORMATS[number][2], number


_reply_fields_are_fixed_text()


def decode_reply(payload: bytes) -> Reply:
    """The Reply of one frame, validated exactly as `decode_fast` validates it (same frames raise
    DecodeError) but without building the dict: this is the load generator's receive hot path."""
    size_total = len(payload)
    if size_total < MTI_SIZE + BITMAP_SIZE or not payload[:MTI_SIZE].isdigit():
        return reply_of(decode_fast(payload))  # raises the precise DecodeError
    start = MTI_SIZE + BITMAP_SIZE * (2 if payload[MTI_SIZE] & 0x80 else 1)
    bitmap = payload[MTI_SIZE:start]
    try:
        layout = _LAYOUTS[bitmap]
    except KeyError:
        layout = _layout_of(bitmap) if len(bitmap) == start - MTI_SIZE else None
        if len(_LAYOUTS) < LAYOUTS_MAX:
            _LAYOUTS[bitmap] = layout
    if layout is None or not payload[start:].isascii():
        return reply_of(decode_fast(payload))
    found = [payload[:MTI_SIZE].decode("ascii"), "", "", "", ""]
    offset = start
    for length_digits, size, wanted in layout:  # bounded: at most one segment per field
        if length_digits:
            digits = payload[offset : offset + length_digits]
            if len(digits) != length_digits or not digits.isdigit() or int(digits) > size:
                return reply_of(decode_fast(payload))
            offset += length_digits
            size = int(digits)
        end = offset + size
        if end > size_total:
            return reply_of(decode_fast(payload))
        for slot, at, width in wanted:
            found[slot] = payload[offset + at : offset + at + width].decode("ascii")
        offset = end
    if offset != size_total:
        return reply_of(decode_fast(payload))
    return Reply(*found)


def reply_of(message: Message) -> Reply:
    """The Reply fields of a decoded message."""
    get = message.get
    return Reply(message["t"], get("11", ""), get("37", ""), get("38", ""), get("39", ""))
