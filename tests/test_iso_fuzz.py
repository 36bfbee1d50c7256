"""Properties of the ISO 8583 edge over random and mutated input: frame splitting, decoding and
request parsing either give an answer or raise one of their documented errors, nothing else.

The documented errors: the frame splitter sets `FramingError` (and closes the connection), `decode`
raises `IsoDecodeError`, `parse_request` raises `FormatError` (`UnsupportedMti` for the MTI). The
answer the switch builds from whatever decoded (a response doc, encoded) never fails either.
`make fuzz` runs the same checks coverage-guided (fuzz/iso_fuzz.py).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authsrv.iso import codec
from authsrv.iso.codec import IsoDecodeError
from authsrv.iso.framing import FRAME_SIZE_MAX, FrameSplitter, FramingError, frame
from authsrv.iso.request import AuthRequest, FormatError, NetworkRequest
from tests import isofuzz
from tests.isofuzz import answer

SEEDS = isofuzz.seed_payloads(isofuzz.fake_cards())

# A mutation: (kind, position, bytes); applied in order to a seed.
_mutation = st.tuples(st.integers(0, 6), st.integers(0, 2**16), st.binary(max_size=16))


def _apply(seed: bytes, mutations: list[tuple[int, int, bytes]]) -> bytes:
    raw = bytearray(seed)
    for kind, position, data in mutations:
        at = position % (len(raw) + 1)
        if kind == 0:  # overwrite
            raw[at:at + len(data)] = data
        elif kind == 1:  # insert
            raw[at:at] = data
        elif kind == 2:  # delete
            del raw[at:at + len(data) + 1]
        elif kind == 3:  # truncate
            del raw[at + 1:]
        elif kind == 4:  # a new MTI
            raw[0:4] = (data + b"0000")[:4]
        elif kind == 5:  # flip bitmap bits
            for index, byte in enumerate(data[:16]):
                if 4 + index < len(raw):
                    raw[4 + index] ^= byte
        else:  # digits over lengths and numbers
            for offset, byte in enumerate(data):
                if at + offset < len(raw):
                    raw[at + offset] = 0x30 + byte % 10
    return bytes(raw[:FRAME_SIZE_MAX]) or b"0"


mutated = st.builds(_apply, st.sampled_from(SEEDS), st.lists(_mutation, min_size=1, max_size=5))
random_bytes = st.binary(min_size=1, max_size=400)
behind_a_header = st.builds(lambda mti, bitmap, rest: mti + bitmap + rest,
                            st.sampled_from([b"0100", b"0200", b"0400", b"0800", b"0120"]) | st.binary(min_size=4, max_size=4),
                            st.binary(min_size=8, max_size=16), st.binary(max_size=200))
hostile = mutated | random_bytes | behind_a_header


@given(hostile)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_and_parse_give_an_answer_or_a_documented_error(payload: bytes) -> None:
    outcome = answer(payload)
    assert isinstance(outcome, (IsoDecodeError, FormatError, AuthRequest, NetworkRequest))
    if isinstance(outcome, (IsoDecodeError, FormatError)):
        str(outcome), repr(outcome)  # printable, whatever the input


@given(st.lists(mutated, max_size=8))
@settings(max_examples=300, deadline=None)
def test_seeds_that_survive_mutation_reencode_as_they_came(payloads: list[bytes]) -> None:
    for payload in payloads:
        try:
            doc = codec.decode(payload)
        except IsoDecodeError:
            continue
        assert codec.encode(doc) == payload  # the profile is exact both ways


@given(
    st.lists(hostile, max_size=12),
    st.sampled_from([b"", b"\x00\x00", b"\xff\xff", b"\x20\x01"]),  # nothing, zero length, too long
    st.lists(st.integers(1, 600), min_size=1, max_size=30),
)
@settings(max_examples=500, deadline=None)
def test_any_stream_splits_into_its_frames_then_a_framing_error(payloads: list[bytes], tail: bytes,
                                                                  sizes: list[int]) -> None:
    """Frames are returned in order whatever the chunking; a bad length prefix ends the stream
    with FramingError (set, never raised), after the good frames before it."""
    wire = b"".join(frame(payload) for payload in payloads) + tail + b"garbage"
    splitter = FrameSplitter(FRAME_SIZE_MAX)
    got: list[bytes] = []
    position = 0
    for size in sizes * (len(wire) // sum(sizes) + 1):  # bounded: covers the wire once
        if position >= len(wire) or splitter.error is not None:
            break
        got += splitter.feed(wire[position:position + size])
        position += size
    # Every tail ends the framing: zero, 65,535, 8,193, or "ga" read as a length (26,465).
    assert got == payloads and isinstance(splitter.error, FramingError)
    for payload in got:
        answer(payload)
