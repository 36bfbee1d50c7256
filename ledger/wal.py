"""Write-ahead log: append-only segments of framed records, group commit on trio.

The log knows nothing of what it stores: records are opaque bytes, numbered by a contiguous
sequence number starting at 1.

On disk, a log is a directory of segment files `wal-<first_seq:020d>.log`. A segment is a run of
records, each framed as

    length u32 | seq u64 | crc32c u32 | payload (length bytes)        little-endian

where the CRC32C covers (length, seq, payload). Segments are append-only; a new segment starts
when the active one would grow past `segment_size_max`.

Durability: commit groups the records of many concurrent callers into one write and one fsync
(one `pwritev(..., RWF_DSYNC)` where Linux has it, so the writer thread takes the GIL back once per
group, not twice); a caller resumes only after its record is on disk. The commit is a two-stage
pipeline: while the log's long-lived writer thread writes and syncs one group, the next gathers on
the trio loop, and is handed off the moment the writer rings the doorbell (an eventfd the loop
waits on: one write(2) and one read(2) per group, no trio token call). Only when the loop looks
idle (no task ready to run) and the disk is fast (recent groups took under `inline_commit_s_max`)
does the committer write in the trio thread itself: handing a group to the thread and back costs
CPU (~40 us more per group than inline on a 2-core VM, measured), and with nothing else to run a
fast fdatasync (~100 us there) delays no one. Under load the pipeline is used (docs/benchmarks.md,
section 8: 3.5x lower p99 at 3,000/s, 1-12% more CPU per authorization).
A torn record at the tail of the last segment is truncated with a log line; a bad checksum or a sequence gap anywhere else stops recovery with `CorruptLogError` naming
the file and the byte offset. The directory is fsync'd whenever a segment is created or deleted.

A disk that cannot take the records (no space left, an I/O error from write or fdatasync) does not
stop the log: the failed group stays in memory, in order, the log reports itself unwritable
(`unwritable_reason`, `accepting`), and the committer tries again every RETRY_INTERVAL_S_MAX at
most, so the log resumes by itself once the disk can be written. Nothing is reported durable that
a successful fdatasync did not cover: after a failed write or fdatasync the bytes past the last
durable offset are in an unknown state (partly written, or in pages the kernel dropped or marked
clean without writing them: the PostgreSQL "fsyncgate" lesson, so an fsync is never simply
retried), so the segment is reopened, cut back to that offset (the cut made durable) and the
records are written again from memory. Segments are preallocated ahead of the writes
(fallocate, FALLOC_FL_KEEP_SIZE, PREALLOCATE_BYTES at a time): a full disk is found there, before
any byte of a record is written, not halfway through one.

Threads: `append` and the hand-off of the buffer run in one thread, the trio thread while
`run_committer` runs (any single thread otherwise). A handed-off group goes into a FIFO queue;
whoever holds the write lock (the committer's worker thread, or `flush_sync`) writes every queued
group in order, so no writer ever waits for another thread to make progress. `truncate_before` may
run in any thread.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import outcome
import trio
from crc32c import crc32c

from ledger.files import HAVE_DSYNC_WRITE, numbered_files, write_all, write_all_dsync

log = logging.getLogger("ledger.wal")

RECORD_SIZE_MAX = 4 * 1024 * 1024  # one payload; a ledger batch is far smaller
SEGMENT_SIZE_MAX = 64 * 1024 * 1024  # a segment is rotated before it would grow past this
# Unwritten bytes held in memory. Past this, append refuses (WalFullError) and the caller backs
# off: memory stays bounded even if the disk stalls under endless load. At ~200 bytes a record
# this is ~80k records, hundreds of fsync times at full load.
BUFFER_BYTES_MAX = 16 * 1024 * 1024
# How far past a damaged record recovery looks for a valid later record before calling the damage
# a torn tail. A valid record after the damage means acknowledged data would be lost by truncating.
TAIL_PROBE_RECORDS = 8
# LogFollower.read_upto: how often it looks again for durable bytes not yet seen whole.
FOLLOW_RETRY_S = 0.01
# A writer waits this long for the write lock (another writer's write + fsync) before giving up.
WRITE_LOCK_WAIT_S_MAX = 120.0
# A waiter is woken once per commit group that could contain its record; more means a bug.
WAIT_ROUNDS_MAX = 8
# Commit in the trio thread while recent groups' write + fdatasync took less than this (an average
# over inline groups, weight 1/INLINE_EWMA_WEIGHT); 0 always uses the worker thread. Thread-mode
# timings are not used: they include the wait for the GIL, which grows with the load itself.
INLINE_COMMIT_S_MAX = 0.0003
INLINE_EWMA_WEIGHT = 8
# In thread mode, every this many groups one is written inline to re-measure the disk.
INLINE_PROBE_GROUPS = 64
# Disk blocks are allocated this far ahead of the writes (never past segment_size_max): a full disk
# is found at allocation, before a record is torn. At rotation what was not used is given back.
PREALLOCATE_BYTES = 4 * 1024 * 1024
# While unwritable the committer tries the failed group again after RETRY_INTERVAL_S_MIN, doubling
# up to RETRY_INTERVAL_S_MAX: the log resumes at most this long after the disk can take it again.
RETRY_INTERVAL_S_MIN = 0.05
RETRY_INTERVAL_S_MAX = 1.0
# `accepting` keeps this much of the buffer for records that compensate what is already buffered
# (an approval whose commit missed its budget is voided), so they always find room.
ACCEPT_RESERVE_BYTES = 1024 * 1024
# Why the log cannot be written, as a fixed set (a metric label): ENOSPC and EDQUOT are "enospc".
UNWRITABLE_REASONS = ("enospc", "eio", "other")

HEADER = struct.Struct("<IQI")  # length, seq, crc32c
HEADER_SIZE = HEADER.size
_LENGTH_SEQ = struct.Struct("<IQ")  # the part of the header the CRC covers
_SEQ = struct.Struct("<Q")
SEGMENT_NAME = re.compile(r"^wal-(\d{20})\.log$")
SEQ_FIRST = 1
FILE_MODE = 0o600  # ledger records are the issuer's books: owner only

_OnCommit = Callable[[int, int, float], None]


class WalError(Exception):
    """The log cannot be used as asked (in use elsewhere, committer stopped...)."""


class CorruptLogError(WalError):
    """A record that is not a torn tail failed its checks. Never skipped silently."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"corrupt write-ahead log: {path} at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class WalFullError(WalError):
    """The unwritten buffer is at BUFFER_BYTES_MAX: the disk is behind. Back off and retry."""


class WalFatalError(WalError):
    """The log is in a state it cannot go on from. The process must stop; reopen to recover."""


class WalUnwritableError(WalError):
    """The disk did not take the records now (no space left, an I/O error). Nothing is lost: they
    stay in memory, in order, and the committer writes them once the disk takes them again."""


def unwritable_reason_of(error: OSError) -> str:
    """The UNWRITABLE_REASONS label of a failed write, fallocate or fsync."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "enospc"
    if error.errno == errno.EIO:
        return "eio"
    return "other"


_FALLOC_FL_KEEP_SIZE = 1  # allocate blocks past the end of the file without changing its size
_libc_fallocate = None
try:
    _libc_fallocate = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).fallocate
    _libc_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _libc_fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: no preallocation (a full disk is found at write)
    _libc_fallocate = None


def _fallocate(fd: int, offset: int, length: int) -> None:
    """fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length); raises OSError. (Tests inject faults here.)

    os.posix_fallocate would grow the file: recovery would then read the zeros as a torn record."""
    if _libc_fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _libc_fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def segment_path(directory: Path, first_seq: int) -> Path:
    assert first_seq >= SEQ_FIRST
    return directory / f"wal-{first_seq:020d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first_seq, path) of every segment file, in sequence order."""
    return numbered_files(directory, SEGMENT_NAME)


def frame(seq: int, payload: bytes) -> bytes:
    """One framed record (used by tests and tools; `Wal.append` inlines the same steps)."""
    head = _LENGTH_SEQ.pack(len(payload), seq)
    return HEADER.pack(len(payload), seq, crc32c(payload, crc32c(head))) + payload


@attrs.frozen
class _Damage:
    offset: int
    reason: str


@attrs.frozen
class _Scan:
    """What a pass over one segment found: records [seq_first, seq_last] end at `end`."""

    seq_first: int
    seq_last: int  # seq_first - 1 when the segment holds no valid record
    end: int  # byte offset just past the last valid record
    damage: _Damage | None


def _check_record(data: memoryview, offset: int, seq_expected: int) -> tuple[int, str | None]:
    """Validate the record at `offset`; return (its end offset, None) or (offset, reason)."""
    size = len(data)
    if size - offset < HEADER_SIZE:
        return offset, f"truncated header ({size - offset} of {HEADER_SIZE} bytes)"
    length, seq, crc = HEADER.unpack_from(data, offset)
    if length == 0 or length > RECORD_SIZE_MAX:
        return offset, f"record length {length} out of range"
    end = offset + HEADER_SIZE + length
    if end > size:
        return offset, f"truncated record (needs {end - offset} bytes, {size - offset} left)"
    crc_actual = crc32c(data[offset + HEADER_SIZE : end], crc32c(data[offset : offset + 12]))
    if crc_actual != crc:
        return offset, f"checksum mismatch (seq field {seq})"
    if seq != seq_expected:
        return offset, f"sequence gap: expected seq {seq_expected}, found {seq}"
    return end, None


def _scan(data: memoryview, seq_first: int) -> _Scan:
    """Walk the records of one segment from its start; stop at the first bad one."""
    offset = 0
    seq = seq_first - 1
    # Each pass consumes at least HEADER_SIZE + 1 bytes: the loop is bounded by len(data).
    while offset < len(data):
        end, reason = _check_record(data, offset, seq + 1)
        if reason is not None:
            return _Scan(seq_first, seq, offset, _Damage(offset, reason))
        assert end > offset
        offset = end
        seq += 1
    return _Scan(seq_first, seq, offset, None)


def _valid_record_after(data: memoryview, start: int, seq_after: int) -> int | None:
    """Offset of a valid record numbered seq_after+1 .. seq_after+TAIL_PROBE_RECORDS past `start`.

    Used to tell a torn tail (nothing valid follows) from damage in the middle of the data, e.g.
    a flipped bit in a length field that makes a middle record look like it runs past the end.
    """
    raw = bytes(data[start:])
    for seq in range(seq_after + 1, seq_after + 1 + TAIL_PROBE_RECORDS):
        needle = _SEQ.pack(seq)
        position = raw.find(needle, 4)
        # Bounded: each find moves strictly forward through `raw`.
        while position != -1:
            offset = start + position - 4
            _, reason = _check_record(data, offset, seq)
            if reason is None:
                return offset
            position = raw.find(needle, position + 1)
    return None


@attrs.define
class _Segment:
    first_seq: int
    path: Path
    size: int


def _fsync_directory(dir_fd: int) -> None:
    os.fsync(dir_fd)


class _Doorbell:
    """How the writer thread tells the committer task a group is written: an eventfd (a socket pair
    where there is none) that trio's epoll watches. A ring costs the writer one write(2); a wait that
    finds it already rung costs the loop one read(2) and no scheduler pass. At most one ring is
    outstanding (one group in flight), so the socket pair never fills."""

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None
        if hasattr(os, "eventfd"):
            self._read_fd = self._write_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:
            self._pair = socket.socketpair()
            for end in self._pair:
                end.setblocking(False)
            self._read_fd, self._write_fd = self._pair[0].fileno(), self._pair[1].fileno()

    def ring(self) -> None:  # any thread
        if self._pair is None:
            os.eventfd_write(self._write_fd, 1)
        else:
            os.write(self._write_fd, b"\0")

    async def wait(self) -> None:  # the trio thread
        # Bounded: a pass either consumes the ring or sleeps until the fd is readable.
        while True:
            try:
                if self._pair is None:
                    os.eventfd_read(self._read_fd)
                else:
                    os.read(self._read_fd, 1)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._read_fd)

    def close(self) -> None:  # the trio thread, once no ring can come
        trio.lowlevel.notify_closing(self._read_fd)
        if self._pair is None:
            os.close(self._read_fd)
        else:
            for end in self._pair:
                end.close()


class Wal:
    """An append-only log with group commit. See the module docstring."""

    def __init__(
        self,
        directory: Path,
        dir_fd: int,
        segments: list[_Segment],
        first_seq: int,
        last_seq: int,
        *,
        segment_size_max: int,
        buffer_bytes_max: int,
        on_commit: _OnCommit | None,
        inline_commit_s_max: float = INLINE_COMMIT_S_MAX,
    ) -> None:
        # Use Wal.open: __init__ only stores what recovery established.
        assert first_seq >= SEQ_FIRST and last_seq >= first_seq - 1
        assert segment_size_max > HEADER_SIZE and buffer_bytes_max > HEADER_SIZE
        assert inline_commit_s_max >= 0
        self.directory = directory
        self._dir_fd = dir_fd
        self._segments = segments
        self.first_seq = first_seq
        self.last_seq = last_seq
        self._segment_size_max = segment_size_max
        self._buffer_bytes_max = buffer_bytes_max
        self._on_commit = on_commit
        # Records appended but not yet handed to a writer: framed bytes, seqs _buffer_first..last.
        self._buffer = bytearray()
        self._buffer_first = last_seq + 1
        # Handed-off groups (first seq, last seq, framed bytes) in seq order, not yet written.
        # The queue lock is held only for a deque operation, never during I/O, so the trio thread
        # can hand off while a worker thread is in fsync.
        self._queue: collections.deque[tuple[int, int, bytearray]] = collections.deque()
        self._queue_lock = threading.Lock()
        # Held while writing queued groups, rotating segments or taking them off the list.
        self._io_lock = threading.Lock()
        self._unlink_pending: list[Path] = []  # segments truncate_before took off the list, not yet unlinked
        self._written_seq = last_seq  # recovered records are on disk
        self._active_fd: int | None = None
        self._fatal: BaseException | None = None
        self._closed = False
        # Committer state, touched only in the trio thread.
        self._committer_token: trio.lowlevel.TrioToken | None = None
        self._committer_thread: int | None = None
        self._committer_stopped = False
        self._committer_idle = False
        self._wakeup = trio.Event()
        self._inflight_last_seq = last_seq
        self._inflight_event = trio.Event()
        self._next_event = trio.Event()
        # The committer's own writer thread (started by run_committer): one long-lived thread is
        # cheaper per group than trio's thread cache (no job naming, no limiter; measured ~120 vs
        # ~250 us of CPU per round trip on a 2-core VM). It holds at most one job (the group in
        # flight) and the stop sentinel: the committer waits for each group before it hands off the
        # next, so this queue is bounded by design.
        self._writer_jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._writer_result: outcome.Outcome | None = None  # set by the writer before it rings
        self._writer_busy = False
        self._doorbell: _Doorbell | None = None
        self._inline_commit_s_max = inline_commit_s_max
        # Moving average of inline groups' write + fdatasync; None until the first probe, so the
        # first groups go to the thread (an unknown disk may be slow: never block the loop on it).
        self._inline_write_s: float | None = None
        self._groups_since_probe = 0
        self.groups_inline = self.groups_threaded = 0  # commit groups by where they were written
        self.groups_loop_busy = 0  # of groups_threaded: written in the thread because the loop had work
        # The disk (see the module docstring). Written under _io_lock, read from any thread.
        self._unwritable: OSError | None = None  # the last failure, until a group is written again
        self._unwritable_since = 0.0  # time.monotonic() of the episode's first failure
        self._failures_before = 0  # write_failures before the episode
        self.write_failures = 0  # failed attempts to write a group, since the log was opened
        self.write_errors = dict.fromkeys(UNWRITABLE_REASONS, 0)  # the same, by reason
        self._tail_dirty = False  # the active segment may hold bytes past its durable size
        self._allocated = 0  # the active segment's blocks are allocated up to this offset
        self._preallocate = _libc_fallocate is not None
        self._dsync_write = HAVE_DSYNC_WRITE  # write + fdatasync in one call (_write_durably)

    # ----------------------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_size_max: int = SEGMENT_SIZE_MAX,
        buffer_bytes_max: int = BUFFER_BYTES_MAX,
        on_commit: _OnCommit | None = None,
        inline_commit_s_max: float = INLINE_COMMIT_S_MAX,
    ) -> Wal:
        """Open (creating the directory if needed) and recover the log in `directory`.

        Takes an exclusive lock on the directory: two processes appending to one log would
        interleave sequence numbers.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise WalError(f"{directory} is in use by another process (locked)") from None
        try:
            segments, first_seq, last_seq = _recover(directory, dir_fd)
        except BaseException:
            os.close(dir_fd)  # closing the descriptor releases the lock
            raise
        return cls(
            directory,
            dir_fd,
            segments,
            first_seq,
            last_seq,
            segment_size_max=segment_size_max,
            buffer_bytes_max=buffer_bytes_max,
            on_commit=on_commit,
            inline_commit_s_max=inline_commit_s_max,
        )

    @property
    def durable_seq(self) -> int:
        """Last seq known to be on disk (written and fsync'd)."""
        return self._written_seq

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def unwritable_reason(self) -> str | None:
        """None while the disk takes the log; else why not (one of UNWRITABLE_REASONS)."""
        error = self._unwritable
        return None if error is None else unwritable_reason_of(error)

    @property
    def writable(self) -> bool:
        return self._unwritable is None

    @property
    def accepting(self) -> bool:
        """Writable, with room in the buffer for one more record of any size and ACCEPT_RESERVE_BYTES
        besides. Work that needs a durable record is refused up front while False (the switch
        answers 91): what is already buffered keeps room for its compensations."""
        if self._unwritable is not None:
            return False
        buffered = len(self._buffer)
        return not buffered or (
            buffered + HEADER_SIZE + RECORD_SIZE_MAX + ACCEPT_RESERVE_BYTES <= self._buffer_bytes_max
        )

    @property
    def unwritten_bytes(self) -> int:
        """Records appended and not yet on disk: the buffer and the groups handed off."""
        with self._queue_lock:
            queued = sum(len(data) for _, _, data in self._queue)
        return len(self._buffer) + queued

    # ----------------------------------------------------------------------------- appending

    def ensure_room(self, length: int) -> None:
        """Raise now what append(payload of `length` bytes) would raise, changing nothing.

        For callers that must not act before they know the record will be accepted.
        """
        assert 0 < length <= RECORD_SIZE_MAX, length
        self._raise_if_fatal()
        buffered = len(self._buffer)
        if buffered and buffered + HEADER_SIZE + length > self._buffer_bytes_max:
            raise WalFullError(f"write-ahead log buffer full ({buffered} bytes unwritten)")

    def append(self, payload: bytes) -> int:
        """Buffer one record; return its seq. Never blocks. Not durable until committed."""
        length = len(payload)
        assert 0 < length <= RECORD_SIZE_MAX, length
        if self._fatal is not None:
            raise WalFatalError("write-ahead log failed earlier; reopen to recover") from self._fatal
        assert not self._closed
        buffer = self._buffer
        if buffer and len(buffer) + HEADER_SIZE + length > self._buffer_bytes_max:
            raise WalFullError(f"write-ahead log buffer full ({len(buffer)} bytes unwritten)")
        seq = self.last_seq + 1
        crc = crc32c(payload, crc32c(_LENGTH_SEQ.pack(length, seq)))
        buffer += HEADER.pack(length, seq, crc)
        buffer += payload
        self.last_seq = seq
        if self._committer_idle:
            self._committer_idle = False
            self._wakeup.set()
        return seq

    def _hand_off(self) -> tuple[int, int]:
        """Queue the whole buffer for writing; return (first seq, last seq) of the group."""
        first, last, data = self._buffer_first, self.last_seq, self._buffer
        assert (last - first + 1 > 0) == (len(data) > 0)
        if data:
            self._buffer = bytearray()
            self._buffer_first = last + 1
            with self._queue_lock:
                self._queue.append((first, last, data))
        return first, last

    # ----------------------------------------------------------------------------- writing

    def _write_through(self, seq: int) -> tuple[int, int, float]:
        """Write and fsync queued groups in order until records up to `seq` are on disk. Any thread.

        Returns (records, bytes, seconds in write + fsync) of what this call wrote; (0, 0, 0.0)
        when another writer already did it. Raises WalFatalError on any I/O error.
        """
        if not self._io_lock.acquire(timeout=WRITE_LOCK_WAIT_S_MAX):
            raise WalFatalError(f"gave up waiting {WRITE_LOCK_WAIT_S_MAX} s to write seq {seq}")
        try:
            records = size = 0
            seconds = 0.0
            # Bounded: each pass writes one queued group, and the queue only holds seqs <= seq
            # that were appended before this call (plus any handed off meanwhile).
            while self._written_seq < seq:
                self._raise_if_fatal()
                with self._queue_lock:
                    first, last, data = self._queue[0]  # taken off once on disk: a failure keeps it
                assert first == self._written_seq + 1, (first, self._written_seq)
                seconds += self._write_group(first, last, data)
                with self._queue_lock:
                    self._queue.popleft()
                records += last - first + 1
                size += len(data)
            return records, size, seconds
        finally:
            self._io_lock.release()

    def _write_group(self, first: int, last: int, data: bytearray) -> float:
        """One durable write (_write_durably) for records [first, last]. Caller holds _io_lock.

        Raises WalUnwritableError when the disk refuses (the group stays queued for a retry)."""
        assert last >= first and len(data) >= (last - first + 1) * (HEADER_SIZE + 1)
        started = time.perf_counter()
        try:
            if self._tail_dirty:
                self._repair_tail()
            fd = self._active_segment_fd(first, len(data))
            self._reserve(fd, len(data))
            self._tail_dirty = True  # from here a failure may leave part of the group in the file
            self._write_durably(fd, data)
        except OSError as error:
            self._failed(error, first)
            raise WalUnwritableError(f"write-ahead log cannot be written: {error}") from error
        self._tail_dirty = False
        self._segments[-1].size += len(data)
        self._written_seq = last
        if self._unwritable is not None:
            log.warning("write-ahead log writable again after %.1f s (%d failed attempts); writing from seq %d",
                        time.monotonic() - self._unwritable_since, self.write_failures - self._failures_before,
                        first)
            self._unwritable = None
        return time.perf_counter() - started

    def _write_durably(self, fd: int, data: bytearray) -> None:
        """The group on disk: one pwritev(RWF_DSYNC) where the kernel has it (the writer thread then
        waits for the GIL once, not twice, before it rings the doorbell), else write + fdatasync."""
        if self._dsync_write:
            try:
                write_all_dsync(fd, data, self._segments[-1].size)
                return
            except OSError as error:
                refused = error.errno in (errno.EINVAL, errno.EOPNOTSUPP)
                if not refused or os.fstat(fd).st_size != self._segments[-1].size:
                    raise
                self._dsync_write = False  # refused before any byte: this kernel or file system lacks it
                log.info("write-ahead log: %s refuses RWF_DSYNC writes (%s); writing with write + fdatasync",
                         self.directory, error)
        write_all(fd, data)
        os.fdatasync(fd)

    def _failed(self, error: OSError, first: int) -> None:
        """Count a failed group and close the active segment (reopened, cut back and written again
        on the next try). One error line per episode (and one more if the reason changes)."""
        reason = unwritable_reason_of(error)
        self.write_failures += 1
        self.write_errors[reason] += 1
        if self._unwritable is None or unwritable_reason_of(self._unwritable) != reason:
            if self._unwritable is None:
                self._unwritable_since, self._failures_before = time.monotonic(), self.write_failures - 1
            log.error("write-ahead log cannot be written (%s): %s; seq %d on are kept in memory and "
                      "written once the disk takes them (tried again every %.1f s at most); until then "
                      "whatever needs a durable record is declined", reason, error, first,
                      RETRY_INTERVAL_S_MAX)
        self._unwritable = error
        self._close_active()

    def _close_active(self) -> None:
        if self._active_fd is not None:
            fd, self._active_fd = self._active_fd, None
            try:
                os.close(fd)
            except OSError:  # close may report a writeback error; the tail is cut back anyway
                pass

    def _repair_tail(self) -> None:
        """Reopen the active segment and cut it back to its durable size (see the module docstring):
        nothing of a failed group stays behind, and the next write starts at a record boundary."""
        self._close_active()
        segment = self._segments[-1]
        fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, segment.size)  # also gives back the blocks allocated past it
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._active_fd = fd
        self._allocated = segment.size
        self._tail_dirty = False

    def _reserve(self, fd: int, size: int) -> None:
        """Allocate the blocks the next `size` bytes of the active segment will take, before they are
        written: PREALLOCATE_BYTES ahead, or just what they need when the disk has no more."""
        used = self._segments[-1].size
        end = used + size
        if end <= self._allocated or not self._preallocate:
            return
        ahead = max(end, min(used + PREALLOCATE_BYTES, self._segment_size_max))
        try:
            _fallocate(fd, used, ahead - used)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._preallocate = False
                log.info("write-ahead log: %s does not support preallocation (%s); a full disk is found "
                         "at write time instead", self.directory, error)
                return
            if error.errno != errno.ENOSPC or ahead == end:
                raise
            _fallocate(fd, used, end - used)  # the last free blocks: ENOSPC here is a full disk
            ahead = end
        self._allocated = ahead

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise WalFatalError("write-ahead log failed earlier") from self._fatal

    def _active_segment_fd(self, first: int, size_next: int) -> int:
        """The descriptor to append [first, ...] to, rotating to a new segment when due."""
        active = self._segments[-1] if self._segments else None
        rotate = active is None or (
            active.size > 0 and active.size + size_next > self._segment_size_max
        )
        if rotate:
            self._start_segment(first)
        elif self._active_fd is None:
            assert active is not None
            # A recovered empty segment is reused: its name must be the next seq.
            assert active.size > 0 or active.first_seq == first, (active.first_seq, first)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
            self._active_fd = os.open(active.path, flags)
            self._allocated = active.size  # unknown past the end: allocated again before a write
        assert self._active_fd is not None
        return self._active_fd

    def _start_segment(self, first: int) -> None:
        """Create wal-<first>.log and make its name durable before any record goes in it."""
        if self._active_fd is not None:
            with contextlib.suppress(OSError):  # give back the blocks allocated and not used
                os.ftruncate(self._active_fd, self._segments[-1].size)
            self._close_active()  # its records were fsync'd by the previous group
        path = segment_path(self.directory, first)
        # Not O_EXCL: an attempt that failed after creating the file (the directory fsync) left it
        # empty, and the next attempt takes it. A file of that name with data in it is not ours.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            if os.fstat(fd).st_size:
                self._fatal = WalError(f"{path} exists and is not empty")
                raise WalFatalError(f"write-ahead log: {path} exists and is not empty; not overwriting it")
            _fsync_directory(self._dir_fd)
        except BaseException:
            os.close(fd)
            raise
        self._active_fd = fd
        self._allocated = 0
        self._segments.append(_Segment(first, path, 0))
        log.info("write-ahead log segment started: %s", path)

    def flush_sync(self) -> None:
        """Write and fsync everything appended so far, synchronously.

        For the CLI, tests, snapshots and shutdown. From the appending thread it writes itself
        (with any group still queued for the committer), raising WalUnwritableError if the disk
        refuses; from another thread while a committer runs, it asks the committer and blocks until
        the records are durable (while the log is unwritable: until the disk takes them).
        """
        self._raise_if_fatal()
        on_other_thread = threading.get_ident() != self._committer_thread
        if self._committer_token is not None and on_other_thread and not self._committer_stopped:
            target = self.last_seq
            trio.from_thread.run(self._wait_via_committer, target, trio_token=self._committer_token)
            assert self.durable_seq >= target
            return
        # Also writes a group the committer handed off but whose thread has not run yet: the
        # committer needs this (trio) thread to start its worker, so waiting would deadlock.
        _, target = self._hand_off()
        try:
            records, size, seconds = self._write_through(target)
        except WalUnwritableError:
            if self._committer_idle:  # (the trio thread) the committer tries again, not only this caller
                self._committer_idle = False
                self._wakeup.set()
            raise
        assert self._written_seq >= target
        if records and self._on_commit is not None:
            self._on_commit(records, size, seconds)
        if not on_other_thread:
            self._publish()

    async def _wait_via_committer(self, seq: int) -> None:
        if self._committer_idle and self._buffer:
            self._committer_idle = False
            self._wakeup.set()
        await self.wait_durable(seq)

    # ----------------------------------------------------------------------------- group commit

    async def wait_durable(self, seq: int, *, unwritable_raises: bool = False) -> None:
        """Return once record `seq` is on disk. Needs `run_committer` running (or a flush).

        While the log is unwritable this waits until the disk takes the record again, or raises
        WalUnwritableError at once if `unwritable_raises` (for work that can be tried later)."""
        assert 0 <= seq <= self.last_seq, (seq, self.last_seq)  # 0: nothing to wait for
        failures_before = self.write_failures
        rounds = 0
        # Bounded: a waiter is woken once per commit group that could hold its record, and once per
        # failed attempt to write one (those are counted).
        while self._written_seq < seq:
            self._raise_if_fatal()
            if self._committer_stopped:
                raise WalError(f"committer stopped before seq {seq} was durable")
            if unwritable_raises and self._unwritable is not None:
                raise WalUnwritableError(f"write-ahead log cannot be written now: {self._unwritable}")
            rounds += 1
            if rounds > WAIT_ROUNDS_MAX + self.write_failures - failures_before:
                raise AssertionError(f"seq {seq} not durable after {WAIT_ROUNDS_MAX} commit groups")
            if seq <= self._inflight_last_seq:
                event = self._inflight_event
            else:
                event = self._next_event
            await event.wait()

    def _publish(self) -> None:
        """Wake the waiters whose records are now durable. Trio thread only."""
        durable = self._written_seq
        if self._inflight_last_seq <= durable:
            self._inflight_event.set()
        if durable >= self.last_seq:
            self._next_event.set()
            self._next_event = trio.Event()

    def _wake_all(self) -> None:
        self._inflight_event.set()
        self._next_event.set()
        self._next_event = trio.Event()

    async def run_committer(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The group commit loop, for the lifetime of the service (until cancelled).

        Whenever records are buffered: take the whole buffer, write it with one write and one
        fdatasync in the writer thread, then wake its waiters. Records appended meanwhile form the
        next group, handed off as soon as the previous one is on disk (a two-stage pipeline: one
        group on the disk, the next gathering on the loop), so the group size adapts to the load
        without any timer and the loop never waits for the disk.
        """
        assert self._committer_token is None, "one committer per log"
        self._committer_token = trio.lowlevel.current_trio_token()
        self._committer_thread = threading.get_ident()
        doorbell = self._doorbell = _Doorbell()
        writer = threading.Thread(target=self._writer_thread, args=(doorbell,), name="wal-writer", daemon=True)
        writer.start()
        task_status.started()
        try:
            retry_s = RETRY_INTERVAL_S_MIN
            # Service loop: each pass commits a group, sleeps until an append, or (while the disk
            # refuses) waits and tries the failed group again.
            while True:
                if not self._buffer and self._written_seq >= self.last_seq:
                    self._committer_idle = True
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                try:
                    await self._commit_one_group()
                except WalUnwritableError:
                    self._commit_failed()
                    await trio.sleep(retry_s)
                    retry_s = min(2 * retry_s, RETRY_INTERVAL_S_MAX)
                    continue
                retry_s = RETRY_INTERVAL_S_MIN
        except WalFatalError:
            self._wake_all()
            raise
        finally:
            self._writer_jobs.put(None)  # the thread ends after any write it is doing
            if not self._writer_busy:  # (a write in flight is always awaited, shielded)
                doorbell.close()
            self._committer_stopped = True
            self._committer_idle = False
            if self._fatal is None:
                self._publish()
            self._wake_all()

    def _commit_failed(self) -> None:
        """The group in flight was not written: nothing is in flight now. Its waiters wait on."""
        self._inflight_last_seq = self._written_seq
        self._wake_all()  # each waiter counts this failure and waits for the next group

    async def _commit_one_group(self) -> None:
        with self._queue_lock:
            queued_last = self._queue[-1][1] if self._queue else None
        if self._unwritable is not None and queued_last is not None:
            last = queued_last  # the failed groups first, alone: the buffer stays bounded meanwhile
        else:
            _, last = self._hand_off()
        self._inflight_last_seq = last
        self._inflight_event = self._next_event
        self._next_event = trio.Event()
        inline = self._commit_inline()
        if inline:
            records, size, seconds = self._write_through(last)
            average = self._inline_write_s
            self._inline_write_s = seconds if average is None else average + (seconds - average) / INLINE_EWMA_WEIGHT
            self.groups_inline += 1
        else:
            records, size, seconds = await self._write_in_thread(last)
            self.groups_threaded += 1
        assert self._written_seq >= last
        self._publish()
        if records and self._on_commit is not None:
            self._on_commit(records, size, seconds)
        if inline:
            # Let the readers run before the next group (an inline write never yielded): what they
            # append meanwhile forms that group, so groups still grow with the load. After a
            # threaded write, what gathered during it is handed off at once (the pipeline).
            await trio.lowlevel.checkpoint()

    async def _write_in_thread(self, last: int) -> tuple[int, int, float]:
        """_write_through(last) in the writer thread; the next group gathers on the loop meanwhile.

        The hand-off is one SimpleQueue.put; the hand-back is the doorbell (an eventfd the loop waits
        on with wait_readable), not a trio token call and an Event per group. Not abandonable: a
        cancelled committer still waits for the write it started."""
        doorbell = self._doorbell
        assert doorbell is not None
        self._writer_busy = True
        self._writer_jobs.put(last)
        with trio.CancelScope(shield=True):
            await doorbell.wait()
        self._writer_busy = False
        written, self._writer_result = self._writer_result, None
        assert written is not None
        return written.unwrap()

    def _writer_thread(self, doorbell: _Doorbell) -> None:
        while True:  # one job per commit group, until run_committer ends
            last = self._writer_jobs.get()
            if last is None:
                return
            self._writer_result = outcome.capture(self._write_through, last)
            doorbell.ring()  # after the result: the loop reads it once it sees the ring

    def _commit_inline(self) -> bool:
        """Write this group in the trio thread? Only when the loop looks idle (then it has nothing
        better to do, and inline saves the hand-off's CPU); and then while the disk has been fast,
        and now and then in thread mode to measure it again (a slow disk then blocks the loop once
        per probe). Under load groups gather while the previous one is written: the pipeline."""
        if self._inline_commit_s_max <= 0 or self._unwritable is not None:
            return False  # a disk in trouble may also be slow: never block the loop on it
        if trio.lowlevel.current_statistics().tasks_runnable:
            # Tasks are ready to run (a partial view: those later in trio's current batch are not
            # counted; ~3 us to ask). The loop has work: it must not wait for the disk too. Under
            # load the waiters a threaded group wakes are runnable here, so the pipeline stays on.
            self.groups_loop_busy += 1
            return False
        if self._inline_write_s is not None and self._inline_write_s <= self._inline_commit_s_max:
            return True
        self._groups_since_probe += 1
        if self._groups_since_probe < INLINE_PROBE_GROUPS:
            return False
        self._groups_since_probe = 0
        return True

    # ----------------------------------------------------------------------------- reading

    def replay(self, from_seq: int = SEQ_FIRST) -> Iterator[tuple[int, bytes]]:
        """Yield (seq, payload) of durable records with seq >= from_seq, checking each again."""
        assert from_seq >= SEQ_FIRST
        limit = self._written_seq
        with self._io_lock:
            segments = [(s.first_seq, s.path) for s in self._segments]
        if segments and from_seq < segments[0][0]:
            raise WalError(f"replay from seq {from_seq}: log starts at seq {segments[0][0]}")
        for index, (first, path) in enumerate(segments):
            next_first = segments[index + 1][0] if index + 1 < len(segments) else limit + 1
            if next_first <= from_seq:
                continue
            if first > limit:
                return
            yield from _replay_segment(path, first, from_seq, limit)

    # ----------------------------------------------------------------------------- maintenance

    def truncate_before(self, seq: int) -> None:
        """Delete whole segments whose records are all < seq (after a snapshot covers them).

        The write lock is held only to take them off the list. Their unlink and the directory's
        fsync run after it: freeing a file's blocks is a journal commit (and a trim, on a disk
        mounted with `discard`), and under the lock every commit waited for it. Deleting 512 MiB
        of segments beside a committing log held a commit 109 ms under the lock, 14 ms after it;
        a soak's publish of a 2M-record snapshot stalled 0.3 s (docs/benchmarks.md). Oldest first, so a crash
        midway leaves a contiguous log. The active segment stays. A segment whose unlink fails is
        tried again at the next call (a restart finds it too: recovery starts at the snapshot).
        """
        assert seq <= self._written_seq + 1, "only durable records may be covered"
        with self._io_lock:
            doomed = self._unlink_pending
            # Bounded by the number of segments; never takes the last one.
            while len(self._segments) > 1 and self._segments[1].first_seq <= seq:
                doomed.append(self._segments.pop(0).path)
            self._unlink_pending = []
            if self._segments:
                self.first_seq = self._segments[0].first_seq
        deleted = 0
        try:
            for path in doomed:  # oldest first
                with contextlib.suppress(FileNotFoundError):  # a retry of an unlink that did happen
                    path.unlink()
                deleted += 1
                log.info("write-ahead log segment deleted: %s", path)
        finally:
            if deleted < len(doomed):
                with self._io_lock:
                    self._unlink_pending = doomed[deleted:] + self._unlink_pending
            if deleted:
                _fsync_directory(self._dir_fd)

    def segment_paths(self) -> list[Path]:
        with self._io_lock:
            return [segment.path for segment in self._segments]

    def close(self) -> None:
        """Flush what is buffered (unless the log failed), close files, release the lock."""
        if self._closed:
            return
        try:
            if self._fatal is None and self._written_seq < self.last_seq:
                try:
                    self.flush_sync()  # buffered records, and groups a stopped committer left queued
                except WalUnwritableError as error:
                    # Never acknowledged (an answer waits for durability): dropped with the process.
                    log.error("write-ahead log closed with seq %d to %d not written (none was "
                              "acknowledged): %s", self._written_seq + 1, self.last_seq, error)
        finally:
            self._closed = True
            with self._io_lock:
                if self._active_fd is not None:
                    if self._segments:
                        with contextlib.suppress(OSError):  # give back the blocks allocated ahead
                            os.ftruncate(self._active_fd, self._segments[-1].size)
                    self._close_active()
            os.close(self._dir_fd)




def _replay_segment(
    path: Path, first: int, from_seq: int, limit: int
) -> Iterator[tuple[int, bytes]]:
    data = memoryview(path.read_bytes())
    offset = 0
    seq = first
    # Bounded by the segment size: each pass consumes one record.
    while seq <= limit and offset < len(data):
        end, reason = _check_record(data, offset, seq)
        if reason is not None:
            raise CorruptLogError(path, offset, f"{reason} (on replay)")
        if seq >= from_seq:
            yield seq, bytes(data[offset + HEADER_SIZE : end])
        offset = end
        seq += 1


def read_log(directory: Path, from_seq: int, upto_seq: int) -> Iterator[tuple[int, bytes]]:
    """(seq, payload) of records from_seq..upto_seq of a log that another process owns and may be
    appending to (ledger.compact: snapshots built by replay). Takes no lock and changes no file.

    The caller knows that every record up to `upto_seq` is durable, and that the owner deletes no
    segment holding one while this reads (it truncates only after the snapshot being built is
    published). Bytes past `upto_seq` are never looked at: they may be half written. A log that
    ends before `upto_seq` raises WalError."""
    assert SEQ_FIRST <= from_seq <= upto_seq + 1
    segments = list_segments(Path(directory))
    if not segments or segments[0][0] > from_seq:
        first = segments[0][0] if segments else None
        raise WalError(f"read from seq {from_seq}: the log in {directory} starts at seq {first}")
    seq_next = from_seq
    for index, (first, path) in enumerate(segments):
        if first > upto_seq:
            break
        if index + 1 < len(segments) and segments[index + 1][0] <= from_seq:
            continue
        for seq, payload in _replay_segment(path, first, from_seq, upto_seq):
            assert seq == seq_next, (seq, seq_next)
            seq_next += 1
            yield seq, payload
    if seq_next != upto_seq + 1:
        raise WalError(f"the log in {directory} ends at seq {seq_next - 1}, before seq {upto_seq}")


class LogFollower:
    """Reads a log that another process owns, record by record as they land: a long-lived
    compactor (ledger.compact, follow mode) keeps its copy of the state current this way, so that
    building a snapshot reads nothing cold from the disk.

    Takes no lock and changes no file. It reads on from where it stopped; the only bytes read twice
    are those of a record not yet whole. Past the last whole record it finds what the owner has not
    written yet: a record still being copied, or the zeros of a preallocated segment. Those are
    never an error here: `poll` stops there and tries again next time. A record whose checksum
    never comes right is found by the caller, which knows what is durable (`read_upto`)."""

    READ_BYTES = 256 * 1024  # per read(2); a longer record is read whole once its header is seen

    def __init__(self, directory: Path, next_seq: int) -> None:
        assert next_seq >= SEQ_FIRST
        self.directory = Path(directory)
        self.next_seq = next_seq  # the first record not yet returned
        self._fd: int | None = None
        self._segment_first = 0
        self._offset = 0  # where the record `_seq` starts in the open segment
        self._seq = 0  # the seq of the record at `_offset`

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def poll(self, upto_seq: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(seq, payload) of the whole records from `next_seq` on (to `upto_seq` at most), as far as
        they are written now. Bounded: each pass returns a record, moves to the next segment, or
        stops."""
        while upto_seq is None or self.next_seq <= upto_seq:
            if self._fd is None and not self._open():
                return
            assert self._fd is not None
            data = os.pread(self._fd, self.READ_BYTES, self._offset)
            if len(data) >= HEADER_SIZE:  # a record longer than one read: read it whole
                length = HEADER.unpack_from(data, 0)[0]
                if len(data) < HEADER_SIZE + length <= HEADER_SIZE + RECORD_SIZE_MAX:
                    data = os.pread(self._fd, HEADER_SIZE + length, self._offset)
            view = memoryview(data)
            offset = 0
            while upto_seq is None or self.next_seq <= upto_seq:
                end, reason = _check_record(view, offset, self._seq)
                if reason is not None:
                    break
                if self._seq >= self.next_seq:
                    yield self._seq, bytes(view[offset + HEADER_SIZE:end])
                    self.next_seq = self._seq + 1
                offset = end
                self._seq += 1
            self._offset += offset
            if offset == 0 and not self._next_segment():
                return

    def _open(self) -> bool:
        """Open the segment that holds `next_seq`, and find that record in it (read from its start)."""
        holding = [(first, path) for first, path in list_segments(self.directory) if first <= self.next_seq]
        if not holding:
            return False
        self._segment_first, path = holding[-1]
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._offset, self._seq = 0, self._segment_first
        return True

    def _next_segment(self) -> bool:
        """At the end of what is written in this segment: go on in the next one if the owner has
        started it (then this one holds nothing more: it rotates only between records)."""
        path = segment_path(self.directory, self._seq)
        if self._seq == self._segment_first or not path.exists():
            return False
        self.close()
        self._segment_first = self._seq
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._offset = 0
        return True

    def read_upto(self, upto_seq: int, timeout_s: float) -> Iterator[tuple[int, bytes]]:
        """Every record from `next_seq` to `upto_seq`, which the caller knows to be durable: waits
        (up to `timeout_s`) for bytes still on their way from the owner's page cache; WalError when
        they never come whole (a damaged record, a log cut short)."""
        deadline = time.monotonic() + timeout_s
        # Bounded: each pass returns records, or sleeps until the deadline passes.
        while self.next_seq <= upto_seq:
            before = self.next_seq
            yield from self.poll(upto_seq)
            if self.next_seq > upto_seq:
                return
            if self.next_seq == before and time.monotonic() >= deadline:
                raise WalError(f"the log in {self.directory} has no whole record at seq {self.next_seq} "
                               f"(durable up to seq {upto_seq}, per its owner)")
            time.sleep(FOLLOW_RETRY_S)


def _recover(directory: Path, dir_fd: int) -> tuple[list[_Segment], int, int]:
    """Scan every segment in order; truncate a torn tail of the last; return the state."""
    found = list_segments(directory)
    if not found:
        return [], SEQ_FIRST, SEQ_FIRST - 1
    segments: list[_Segment] = []
    seq_expected = found[0][0]
    for index, (first, path) in enumerate(found):
        if first != seq_expected:
            raise CorruptLogError(path, 0, f"sequence gap: file starts at seq {first}, "
                                  f"expected {seq_expected}")
        is_last = index == len(found) - 1
        data = memoryview(path.read_bytes())
        scan = _scan(data, first)
        if scan.damage is not None:
            _classify_damage(path, data, scan, is_last, dir_fd)
        if not is_last and scan.seq_last < first:
            raise CorruptLogError(path, 0, "empty segment before the last one")
        segments.append(_Segment(first, path, scan.end))
        seq_expected = scan.seq_last + 1
    return segments, found[0][0], seq_expected - 1


def _classify_damage(
    path: Path, data: memoryview, scan: _Scan, is_last: bool, dir_fd: int
) -> None:
    """A torn tail of the last segment is truncated; anything else is corruption."""
    assert scan.damage is not None
    damage = scan.damage
    if not is_last:
        raise CorruptLogError(path, damage.offset, damage.reason)
    later = _valid_record_after(data, damage.offset, scan.seq_last + 1)
    if later is not None:
        raise CorruptLogError(
            path, damage.offset, f"{damage.reason}; a valid record follows at offset {later}"
        )
    log.warning(
        "write-ahead log: torn record at the tail of %s at byte offset %d (%s); "
        "truncating %d bytes",
        path,
        damage.offset,
        damage.reason,
        len(data) - damage.offset,
    )
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, damage.offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_directory(dir_fd)
