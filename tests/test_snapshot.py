"""Snapshot files: atomic write, pruning, validation, fallback from a damaged newest one."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest

from ledger import snapshot as snapshot_module
from ledger.snapshot import (
    HEADER_SIZE,
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    SNAPSHOTS_KEPT,
    SnapshotError,
    list_snapshots,
    load_latest_snapshot,
    read_snapshot,
    snapshot_path,
    write_snapshot,
    write_snapshot_temporary,
)


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 42, b"state at 42")
    assert path == tmp_path / "snapshot-00000000000000000042.snap"
    data = path.read_bytes()
    magic, version, seq, length, _ = struct.unpack_from("<8sIQQI", data)
    assert (magic, version, seq, length) == (SNAPSHOT_MAGIC, SNAPSHOT_VERSION, 42, 11)
    assert data[HEADER_SIZE:] == b"state at 42"
    assert load_latest_snapshot(tmp_path) == (42, b"state at 42")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left



def test_a_paced_write_makes_each_piece_durable_before_the_next(tmp_path: Path, monkeypatch) -> None:
    """A compactor's snapshot reaches the disk a piece at a time, so a live log's commits never
    wait behind all of it; the file is the same as written whole."""
    monkeypatch.setattr(snapshot_module, "PACED_CHUNK_BYTES", 1000)
    payload = bytes(range(256)) * 20  # 5,120 bytes: six pieces
    unsynced: list[int] = []
    real_write, real_fdatasync = snapshot_module.write_all, os.fdatasync
    written = [0]

    def counting_write(fd: int, data) -> None:
        real_write(fd, data)
        written[0] += len(data)

    def recording_fdatasync(fd: int) -> None:
        unsynced.append(written[0])
        written[0] = 0
        real_fdatasync(fd)

    monkeypatch.setattr(snapshot_module, "write_all", counting_write)
    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    (tmp_path / "paced").mkdir()
    (tmp_path / "whole").mkdir()
    paced = write_snapshot_temporary(tmp_path / "paced", 7, payload, paced=True)
    whole = write_snapshot_temporary(tmp_path / "whole", 7, payload)
    assert paced.read_bytes() == whole.read_bytes()
    assert len(unsynced) == 6 and max(unsynced) <= 1000 + HEADER_SIZE  # never more than a piece in flight


def test_no_snapshot_is_none(tmp_path: Path) -> None:
    assert load_latest_snapshot(tmp_path) is None


def test_keeps_the_newest_two_and_removes_stale_temporaries(tmp_path: Path) -> None:
    stale = tmp_path / "snapshot-00000000000000000003.snap.tmp"
    stale.write_bytes(b"half written by a crashed process")
    for seq in (5, 9, 14, 20):
        write_snapshot(tmp_path, seq, b"state %d" % seq)
    assert SNAPSHOTS_KEPT == 2
    assert [seq for seq, _ in list_snapshots(tmp_path)] == [14, 20]
    assert not stale.exists()
    assert load_latest_snapshot(tmp_path) == (20, b"state 20")


def test_an_unrenamed_temporary_file_never_counts(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 5, b"five")
    (tmp_path / "snapshot-00000000000000000009.snap.tmp").write_bytes(b"crashed before rename")
    assert load_latest_snapshot(tmp_path) == (5, b"five")


def test_rewriting_the_same_seq_replaces_it(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 5, b"first")
    write_snapshot(tmp_path, 5, b"second")
    assert load_latest_snapshot(tmp_path) == (5, b"second")


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "payload bit":
        data[-1] ^= 0x01
    elif how == "seq bit":
        data[12] ^= 0x02
    elif how == "magic":
        data[0:8] = b"NOTASNAP"
    elif how == "version":
        data[8:12] = struct.pack("<I", 99)
    elif how == "truncated":
        data = data[:-3]
    elif how == "short":
        data = data[:10]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how, message",
    [
        ("payload bit", "checksum mismatch"),
        ("seq bit", "does not match the file name"),
        ("magic", "bad magic"),
        ("version", "unsupported version 99"),
        ("truncated", "payload bytes on disk"),
        ("short", "out of range"),
    ],
)
def test_damage_is_detected_and_names_the_file(tmp_path: Path, how: str, message: str) -> None:
    path = write_snapshot(tmp_path, 7, b"some state bytes")
    damage(path, how)
    with pytest.raises(SnapshotError, match=message) as caught:
        read_snapshot(path)
    assert str(path) in str(caught.value)


def test_renamed_file_does_not_pass_as_another_seq(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 7, b"state")
    path.rename(snapshot_path(tmp_path, 8))
    with pytest.raises(SnapshotError, match="header seq 7 does not match"):
        load_latest_snapshot(tmp_path)


def test_damaged_newest_falls_back_when_the_log_covers_the_gap(tmp_path: Path, caplog) -> None:
    write_snapshot(tmp_path, 10, b"ten")
    newest = write_snapshot(tmp_path, 20, b"twenty")
    damage(newest, "payload bit")
    with caplog.at_level(logging.WARNING, logger="ledger.snapshot"):
        assert load_latest_snapshot(tmp_path, log_first_seq=11) == (10, b"ten")
    [warning] = [r.getMessage() for r in caplog.records]
    assert "falling back to the snapshot at seq 10" in warning and newest.name in warning
    assert load_latest_snapshot(tmp_path) == (10, b"ten")  # without the log, the caller checks


def test_damaged_newest_errors_when_the_log_does_not_cover(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 10, b"ten")
    newest = write_snapshot(tmp_path, 20, b"twenty")
    damage(newest, "payload bit")
    with pytest.raises(SnapshotError, match="log starts at seq 15") as caught:
        load_latest_snapshot(tmp_path, log_first_seq=15)
    assert str(newest) in str(caught.value)


def test_all_damaged(tmp_path: Path) -> None:
    for seq in (10, 20):
        damage(write_snapshot(tmp_path, seq, b"x" * seq), "payload bit")
    with pytest.raises(SnapshotError, match="no usable snapshot"):
        load_latest_snapshot(tmp_path)
    with pytest.raises(SnapshotError, match="no usable snapshot"):
        load_latest_snapshot(tmp_path, log_first_seq=11)
    # A log that still starts at seq 1 rebuilds everything by itself.
    assert load_latest_snapshot(tmp_path, log_first_seq=1) is None


def test_empty_payload_and_negative_seq_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AssertionError):
        write_snapshot(tmp_path, 1, b"")
    with pytest.raises(AssertionError):
        write_snapshot(tmp_path, -1, b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_written_without_fsync_is_synced_before_it_is_published(tmp_path: Path) -> None:
    # The forked writer skips the fsync (it would only live longer); the parent syncs, then publishes.
    from ledger.snapshot import publish_snapshot, sync_snapshot_temporary, write_snapshot_temporary

    temporary = write_snapshot_temporary(tmp_path, 7, b"state at seven", sync=False)
    sync_snapshot_temporary(tmp_path, 7)
    assert temporary.exists()
    publish_snapshot(tmp_path, 7)
    assert load_latest_snapshot(tmp_path) == (7, b"state at seven")


def test_a_temporary_that_cannot_be_synced_is_removed_and_the_error_raised(tmp_path: Path, monkeypatch) -> None:
    import os

    from ledger import snapshot
    from ledger.snapshot import sync_snapshot_temporary, write_snapshot_temporary

    temporary = write_snapshot_temporary(tmp_path, 7, b"state at seven", sync=False)

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        sync_snapshot_temporary(tmp_path, 7)
    assert not temporary.exists()  # no half-synced snapshot left taking the disk's space
    monkeypatch.setattr(snapshot.os, "fsync", os.fsync)
    assert load_latest_snapshot(tmp_path) is None
