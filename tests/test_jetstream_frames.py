"""The replicated log's framing: records packed into messages (parts for large ones) and read back,
in order, from the first message or from any message a snapshot points at."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import jetstream
from ledger.jetstream import MESSAGE_BYTES_MAX, FrameReader, encode_frames

SIZES = st.one_of(st.integers(0, 300), st.integers(MESSAGE_BYTES_MAX // 3, MESSAGE_BYTES_MAX * 2 + 17))


def records_of(sizes: list[int], first_seq: int = 1) -> list[tuple[int, int, bytes]]:
    return [(1 + seq % 3, seq, bytes([seq % 251]) * size) for seq, size in enumerate(sizes, first_seq)]


@settings(max_examples=60, deadline=None)
@given(st.lists(SIZES, min_size=1, max_size=12), st.data())
def test_records_come_back_whole_and_in_order(sizes, data) -> None:
    records = records_of(sizes)
    messages = list(encode_frames(records))
    assert all(len(body) <= MESSAGE_BYTES_MAX for body, _, _, _ in messages)
    reader = FrameReader()
    back = [record for stream_seq, (body, _, _, _) in enumerate(messages, 1) for record in reader.feed(body, stream_seq)]
    assert [(r.kind, r.seq, r.payload) for r in back] == records
    completes = [completes for _, _, completes, _ in messages if completes]
    assert sum(count for _, _, _, count in messages) == len(records)
    assert completes == sorted(completes) and completes[-1] == records[-1][1]

    # A reader that starts at a message where some record starts gets every record from it on.
    starting = [(index, starts) for index, (_, starts, _, _) in enumerate(messages) if starts]
    index, starts = data.draw(st.sampled_from(starting))
    reader = FrameReader()
    later = [record for body, _, _, _ in messages[index:] for record in reader.feed(body, 0)]
    assert [r.seq for r in later][0] <= starts
    assert [(r.kind, r.seq, r.payload) for r in later if r.seq >= starts] == [x for x in records if x[1] >= starts]


def test_a_record_left_incomplete_by_a_deposed_writer_is_dropped() -> None:
    big = records_of([MESSAGE_BYTES_MAX * 2])
    first, second, _ = list(encode_frames(big))
    reader = FrameReader()
    assert reader.feed(first[0], 1) == []  # parts of record 1 ...
    term = next(encode_frames([(jetstream.KIND_TERM, 1, b"new primary")]))[0]
    (record,) = reader.feed(term, 2)  # ... then the new primary's TERM reuses seq 1
    assert (record.kind, record.seq, record.payload) == (jetstream.KIND_TERM, 1, b"new primary")
