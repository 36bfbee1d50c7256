"""ISO 8583 framing and codec of the network simulator (CONTRACT.md section 3).

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

import iso8583
import iso8583.specs

SPEC = iso8583.specs.default
LENGTH_HEADER_SIZE = 2  # bytes, big-endian unsigned (CONTRACT.md section 3)
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
