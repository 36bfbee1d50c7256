"""Snapshot files: a whole state image that covers the log up to a sequence number.

File `snapshot-<seq:020d>.snap`:

    magic 8s | version u32 | seq u64 | length u64 | crc32c u32 | payload (length bytes)

little-endian; the CRC32C covers (version, seq, length) and the payload. The issue's words: write
to a temporary file, fsync it, rename it, then fsync the directory; record the sequence number the
snapshot covers; only after that delete the log segments it covers (the caller does that).

The newest SNAPSHOTS_KEPT snapshots are kept so that a damaged newest one can fall back to the
previous one, as long as the log still holds every record after it (the caller keeps the log from
the oldest kept snapshot on, and checks).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from pathlib import Path

from crc32c import crc32c

from ledger.files import fsync_directory, numbered_files, write_all

log = logging.getLogger("ledger.snapshot")

SNAPSHOT_MAGIC = b"AUTHSNAP"
SNAPSHOT_VERSION = 1
SNAPSHOTS_KEPT = 2
SNAPSHOT_SIZE_MAX = 16 * 1024**3  # a sanity bound on one state image
SNAPSHOT_NAME = re.compile(r"^snapshot-(\d{20})\.snap$")
TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o600  # the issuer's books: owner only
# A paced write (write_snapshot_temporary): at most this much of a snapshot waits to reach the disk
# at a time, and the disk is left alone this long between two pieces.
PACED_CHUNK_BYTES = 4 * 1024 * 1024
PACED_PAUSE_S = 0.005

HEADER = struct.Struct("<8sIQQI")  # magic, version, seq, length, crc32c
HEADER_SIZE = HEADER.size
_COVERED = struct.Struct("<IQQ")  # the header fields the CRC covers


class SnapshotError(Exception):
    """A snapshot cannot be used. The message names the file."""


def snapshot_path(directory: Path, seq: int) -> Path:
    assert seq >= 0
    return directory / f"snapshot-{seq:020d}.snap"


def list_snapshots(directory: Path) -> list[tuple[int, Path]]:
    """(seq, path) of every snapshot file, oldest first. Temporary files are not listed."""
    return numbered_files(directory, SNAPSHOT_NAME)


def _checksum(seq: int, payload: bytes) -> int:
    return crc32c(payload, crc32c(_COVERED.pack(SNAPSHOT_VERSION, seq, len(payload))))


def write_snapshot(directory: Path, seq: int, payload: bytes) -> Path:
    """Durably write the snapshot covering records <= seq; prune older ones. Returns its path."""
    write_snapshot_temporary(directory, seq, payload)
    return publish_snapshot(directory, seq)


def write_snapshot_temporary(directory: Path, seq: int, payload: bytes, *, sync: bool = True,
                             paced: bool = False) -> Path:
    """The first half of write_snapshot: the file under its temporary name, fsync'd (unless `sync`
    is False: then sync_snapshot_temporary before publishing), not yet in use. Logs nothing (a
    forked child writes it: authsrv's snapshots off the event loop).

    `paced` (a compactor, whose time costs no one): PACED_CHUNK_BYTES at a time, each made durable
    before the next, with a PACED_PAUSE_S pause. A live log shares the disk, and each of its
    fdatasyncs ends in a cache flush that waits for whatever else the disk holds: written whole,
    a snapshot of hundreds of MiB sits in front of every commit for as long as it takes to land."""
    directory = Path(directory)
    assert seq >= 0
    assert 0 < len(payload) <= SNAPSHOT_SIZE_MAX - HEADER_SIZE, len(payload)
    temporary = _temporary_path(directory, seq)
    header = HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, seq, len(payload), _checksum(seq, payload))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd = os.open(temporary, flags, FILE_MODE)
    try:
        try:
            write_all(fd, header)
            if paced:
                view = memoryview(payload)
                for start in range(0, len(view), PACED_CHUNK_BYTES):  # bounded by the payload's size
                    write_all(fd, view[start:start + PACED_CHUNK_BYTES])
                    os.fdatasync(fd)
                    time.sleep(PACED_PAUSE_S)
            else:
                write_all(fd, payload)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk: do not keep half a snapshot taking its space
        raise
    return temporary


def sync_snapshot_temporary(directory: Path, seq: int) -> None:
    """fsync the temporary file another process wrote with sync=False. On failure (an I/O error, or
    a full disk found only now, as delayed allocation may) the file is removed and the error raised."""
    temporary = _temporary_path(Path(directory), seq)
    try:
        fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def publish_snapshot(directory: Path, seq: int) -> Path:
    """The second half: rename the temporary file into place, fsync the directory, prune."""
    directory = Path(directory)
    final = snapshot_path(directory, seq)
    os.rename(_temporary_path(directory, seq), final)
    fsync_directory(directory)
    log.info("snapshot written: %s (%d bytes, covers seq %d)", final, final.stat().st_size - HEADER_SIZE, seq)
    _prune(directory, keep=final)
    return final


def _temporary_path(directory: Path, seq: int) -> Path:
    final = snapshot_path(directory, seq)
    return final.with_name(final.name + TEMP_SUFFIX)


def _prune(directory: Path, keep: Path) -> None:
    """Delete snapshots older than the newest SNAPSHOTS_KEPT, and stale temporary files."""
    doomed = [path for _, path in list_snapshots(directory)[:-SNAPSHOTS_KEPT]]
    doomed += [
        path
        for path in directory.glob(f"snapshot-*.snap{TEMP_SUFFIX}")
        if path.name != keep.name + TEMP_SUFFIX
    ]
    assert keep not in doomed
    for path in doomed:
        path.unlink(missing_ok=True)
        log.info("snapshot deleted: %s", path)
    if doomed:
        fsync_directory(directory)


def read_snapshot(path: Path) -> tuple[int, bytes]:
    """(seq, payload) of one snapshot file, after checking it; SnapshotError names the file."""
    match = SNAPSHOT_NAME.match(path.name)
    assert match is not None, path
    size = path.stat().st_size
    if size < HEADER_SIZE or size > SNAPSHOT_SIZE_MAX:
        raise SnapshotError(f"snapshot {path}: size {size} bytes is out of range")
    data = path.read_bytes()
    magic, version, seq, length, crc = HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotError(f"snapshot {path}: bad magic {magic!r}")
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(f"snapshot {path}: unsupported version {version}")
    if seq != int(match.group(1)):
        raise SnapshotError(f"snapshot {path}: header seq {seq} does not match the file name")
    if length != len(data) - HEADER_SIZE:
        raise SnapshotError(f"snapshot {path}: length {length} but {len(data) - HEADER_SIZE} "
                            "payload bytes on disk")
    payload = data[HEADER_SIZE:]
    if _checksum(seq, payload) != crc:
        raise SnapshotError(f"snapshot {path}: checksum mismatch")
    return seq, payload


def load_latest_snapshot(
    directory: Path, *, log_first_seq: int | None = None
) -> tuple[int, bytes] | None:
    """The newest valid snapshot as (seq, payload), or None when there is none.

    A damaged newest snapshot falls back to the previous one with a warning. The fallback is only
    sound if the log still holds every record after the older snapshot: pass `log_first_seq`
    (the first seq on disk) and this checks it, raising SnapshotError naming the damaged file
    when the log does not cover the gap. Without it the caller must check.
    """
    snapshots = list_snapshots(Path(directory))
    damaged: list[SnapshotError] = []
    # Bounded by the number of snapshot files (normally SNAPSHOTS_KEPT).
    for seq_named, path in reversed(snapshots):
        try:
            seq, payload = read_snapshot(path)
        except SnapshotError as error:
            damaged.append(error)
            continue
        if damaged:
            _check_fallback(damaged, seq_named, log_first_seq)
        return seq, payload
    if not damaged:
        return None
    if log_first_seq is not None and log_first_seq <= 1:
        _check_fallback(damaged, 0, log_first_seq)  # the log alone rebuilds the state
        return None
    raise SnapshotError(f"no usable snapshot: {'; '.join(str(e) for e in damaged)}")


def _check_fallback(damaged: list[SnapshotError], seq: int, log_first_seq: int | None) -> None:
    if log_first_seq is not None and log_first_seq > seq + 1:
        raise SnapshotError(
            f"{damaged[0]}; the previous snapshot covers only up to seq {seq} and the log "
            f"starts at seq {log_first_seq}"
        )
    log.warning(
        "falling back to the snapshot at seq %d: %s",
        seq,
        "; ".join(str(error) for error in damaged),
    )
