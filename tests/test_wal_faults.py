"""The write-ahead log on a disk that refuses: no space left (ENOSPC) or an I/O error (EIO) from
fallocate, write, fdatasync, the segment's creation or the directory's fsync. The log does not
fail: it keeps the records in memory, says why it cannot write, tries again, and resumes by itself
with nothing lost, nothing torn and nothing reported durable that was not fdatasync'd after the
damage was cut away (docs/operations.md, "Full disk and I/O errors")."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import trio

from ledger import wal as wal_module
from ledger.wal import (
    HEADER_SIZE,
    Wal,
    WalFullError,
    WalUnwritableError,
    frame,
    list_segments,
)
from tests.diskfaults import DiskFaults


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(wal_module, "RETRY_INTERVAL_S_MAX", 0.05)
    monkeypatch.setattr(wal_module, "RETRY_INTERVAL_S_MIN", 0.01)
    # Every group allocates its own blocks (no chunk ahead), so an armed fallocate fault is met at
    # once, as on a disk whose last preallocated chunk is used up.
    monkeypatch.setattr(wal_module, "PREALLOCATE_BYTES", 1)


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ledger.wal" and r.levelno >= logging.ERROR]


def on_disk(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for _, path in list_segments(directory))


def replayed(directory: Path) -> list[tuple[int, bytes]]:
    log = Wal.open(directory)
    try:
        return list(log.replay())
    finally:
        log.close()


async def fail_then_recover(log: Wal, faults: DiskFaults, code: int, calls: tuple[str, ...],
                            payloads: list[bytes], *, failures_min: int = 3) -> None:
    """Arm the fault, append `payloads`, check the log waits (not durable, unwritable, not
    accepting), disarm, and check every payload becomes durable."""
    durable_before, failures_before = log.durable_seq, log.write_failures
    faults.arm(code, *calls)
    seqs = [log.append(payload) for payload in payloads]
    with trio.fail_after(10):
        while log.write_failures - failures_before < failures_min:
            await trio.sleep(0.01)
    assert log.durable_seq == durable_before
    assert log.unwritable_reason == ("enospc" if code == errno.ENOSPC else "eio")
    assert not log.writable and not log.accepting
    assert log.write_errors[log.unwritable_reason] >= failures_min
    assert sum(faults.failures.values()) >= log.write_failures
    with pytest.raises(WalUnwritableError):
        await log.wait_durable(seqs[-1], unwritable_raises=True)
    faults.disarm()
    with trio.fail_after(10):
        await log.wait_durable(seqs[-1])
    assert log.writable and log.unwritable_reason is None and log.accepting


@pytest.mark.parametrize(
    "code, calls, partial",
    [
        (errno.ENOSPC, ("fallocate",), False),  # the usual full disk: found before a byte is written
        (errno.ENOSPC, ("write",), True),  # a file system without preallocation: torn mid-record
        (errno.EIO, ("write",), True),
        (errno.EIO, ("fdatasync",), False),
    ],
)
async def test_log_waits_out_a_refusing_disk_and_resumes_with_nothing_torn(
        tmp_path: Path, monkeypatch, caplog, code, calls, partial) -> None:
    log = Wal.open(tmp_path, inline_commit_s_max=0)
    faults = DiskFaults(monkeypatch, tmp_path)
    faults.partial_write = partial
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run_committer)
        with trio.fail_after(5):
            await log.wait_durable(log.append(b"before"))
        waiters_done: list[int] = []

        async def waiter(seq: int) -> None:
            await log.wait_durable(seq)  # never raises while the disk refuses: it waits
            waiters_done.append(seq)

        faults.arm(code, *calls)
        for index in range(20):
            nursery.start_soon(waiter, log.append(b"during %d" % index))
            await trio.sleep(0.005)
        with trio.fail_after(10):
            while sum(faults.failures.values()) < 2 * wal_module.WAIT_ROUNDS_MAX:  # more than a waiter's rounds
                await trio.sleep(0.01)
        assert log.durable_seq == 1 and waiters_done == []
        if "fallocate" in calls:  # found at allocation: not a byte of the failed group reached the file
            assert on_disk(tmp_path) == frame(1, b"before")
        faults.disarm()
        with trio.fail_after(10):
            await log.wait_durable(log.append(b"after"))
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(waiters_done) == list(range(2, 22))
        nursery.cancel_scope.cancel()
    log.close()
    expected = [b"before", *(b"during %d" % index for index in range(20)), b"after"]
    assert on_disk(tmp_path) == b"".join(frame(seq, p) for seq, p in enumerate(expected, start=1))
    assert [p for _, p in replayed(tmp_path)] == expected
    assert len(error_lines(caplog)) == 1, error_lines(caplog)  # one line for the episode, not one per try
    assert not [r for r in caplog.records if "torn" in r.getMessage()]


async def test_one_error_line_per_episode(tmp_path: Path, monkeypatch, caplog) -> None:
    log = Wal.open(tmp_path)
    faults = DiskFaults(monkeypatch, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run_committer)
        await fail_then_recover(log, faults, errno.ENOSPC, ("fallocate",), [b"a", b"b"])
        assert len(error_lines(caplog)) == 1
        await fail_then_recover(log, faults, errno.EIO, ("fdatasync",), [b"c"])
        assert len(error_lines(caplog)) == 2
        assert "(enospc)" in error_lines(caplog)[0] and "(eio)" in error_lines(caplog)[1]
        assert sum(log.write_errors.values()) == log.write_failures >= 6
        nursery.cancel_scope.cancel()
    log.close()
    assert [p for _, p in replayed(tmp_path)] == [b"a", b"b", b"c"]


async def test_the_buffer_stays_bounded_while_the_disk_refuses(tmp_path: Path, monkeypatch) -> None:
    """Appends go on into the bounded buffer (WalFullError past it, never a crash); the failed group
    is tried alone, so the buffer is not handed off into an unbounded queue meanwhile."""
    log = Wal.open(tmp_path, buffer_bytes_max=4000)
    faults = DiskFaults(monkeypatch, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run_committer)
        faults.arm(errno.ENOSPC, "fallocate")
        first = log.append(b"x" * 100)
        with trio.fail_after(5):
            while log.write_failures < 3:
                await trio.sleep(0.01)
        accepted = 0
        with pytest.raises(WalFullError):
            for _ in range(1000):
                log.append(b"y" * 100)
                accepted += 1
                if accepted % 10 == 0:
                    await trio.sleep(0.02)  # retries happen meanwhile
        assert accepted == 4000 // (HEADER_SIZE + 100)
        assert log.unwritten_bytes <= 4000 + HEADER_SIZE + 100  # the buffer and the one failed group
        faults.disarm()
        with trio.fail_after(5):
            await log.wait_durable(log.last_seq)
        assert log.durable_seq == first + accepted
        nursery.cancel_scope.cancel()
    log.close()


async def test_segment_creation_and_directory_fsync_failures(tmp_path: Path, monkeypatch) -> None:
    """Rotation on a refusing disk: a directory fsync that fails after the new file was created
    leaves it empty, and the next attempt takes it (not a second file, not an error forever)."""
    record = HEADER_SIZE + 40
    log = Wal.open(tmp_path, segment_size_max=3 * record)
    faults = DiskFaults(monkeypatch, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run_committer)
        for index in range(3):
            with trio.fail_after(5):
                await log.wait_durable(log.append(b"%040d" % index))
        assert len(list_segments(tmp_path)) == 1
        await fail_then_recover(log, faults, errno.EIO, ("fsync",), [b"%040d" % 3])  # the directory's
        await fail_then_recover(log, faults, errno.ENOSPC, ("fallocate",), [b"%040d" % index for index in (4, 5, 6)])
        nursery.cancel_scope.cancel()
    log.close()
    assert [first for first, _ in list_segments(tmp_path)] == [1, 4, 5]  # 5-7: one group
    assert [p for _, p in replayed(tmp_path)] == [b"%040d" % index for index in range(7)]


async def test_close_while_unwritable_drops_only_what_was_never_durable(tmp_path: Path, monkeypatch, caplog) -> None:
    log = Wal.open(tmp_path)
    faults = DiskFaults(monkeypatch, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run_committer)
        with trio.fail_after(5):
            await log.wait_durable(log.append(b"acknowledged"))
        faults.arm(errno.EIO, "write")
        faults.partial_write = True
        log.append(b"never acknowledged")
        with trio.fail_after(5):
            while log.write_failures < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    with pytest.raises(WalUnwritableError):
        log.flush_sync()
    log.close()  # logs what it could not write; does not raise
    assert any("not written (none was acknowledged)" in line for line in error_lines(caplog))
    faults.disarm()
    assert replayed(tmp_path) == [(1, b"acknowledged")]  # a torn half record, if any, is cut at recovery


async def test_segments_are_preallocated_ahead_and_the_rest_given_back_at_rotation(tmp_path: Path, monkeypatch) -> None:
    chunk = 64 * 1024
    monkeypatch.setattr(wal_module, "PREALLOCATE_BYTES", chunk)
    faults = DiskFaults(monkeypatch, tmp_path)
    log = Wal.open(tmp_path, segment_size_max=3 * chunk)
    log.append(b"z" * 100)
    log.flush_sync()
    calls = [call for call in faults.calls if call[0] != "fsync"]  # the new segment's directory entry
    assert calls[:3] == [("fallocate", chunk), ("write", HEADER_SIZE + 100), ("fdatasync", 0)]
    [(_, path)] = list_segments(tmp_path)
    stat = path.stat()
    assert stat.st_size == HEADER_SIZE + 100
    if stat.st_blocks * 512 < chunk:
        pytest.skip("this file system ignores FALLOC_FL_KEEP_SIZE")
    for _ in range(chunk // 100):  # past the first chunk: allocated again, before the write that needs it
        log.append(b"z" * 100)
    log.flush_sync()
    allocated = [end for call, end in faults.calls if call == "fallocate"]
    assert allocated[-1] >= path.stat().st_size and len(allocated) == 2
    for _ in range(3 * chunk // 100):  # a group that does not fit: a new segment
        log.append(b"z" * 100)
    log.flush_sync()
    (_, old), (_, new) = list_segments(tmp_path)
    assert old.stat().st_blocks * 512 < old.stat().st_size + 8192  # what it did not use was given back
    assert new.stat().st_size > 0
    log.close()


async def test_a_nearly_full_disk_is_used_to_its_last_block(tmp_path: Path, monkeypatch) -> None:
    """Preallocating a whole chunk fails, the group's own size does not: the group is written."""
    real = wal_module._fallocate

    def small_disk(fd: int, offset: int, length: int) -> None:
        if length > 10_000:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        real(fd, offset, length)

    monkeypatch.setattr(wal_module, "_fallocate", small_disk)
    log = Wal.open(tmp_path)
    log.append(b"fits")
    log.flush_sync()
    assert log.durable_seq == 1 and log.writable
    log.close()


async def test_without_preallocation_support_the_log_still_writes(tmp_path: Path, monkeypatch, caplog) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported (injected)")

    monkeypatch.setattr(wal_module, "_fallocate", unsupported)
    caplog.set_level(logging.INFO, logger="ledger.wal")
    log = Wal.open(tmp_path)
    for index in range(3):
        log.append(b"r%d" % index)
        log.flush_sync()
    log.close()
    assert [p for _, p in replayed(tmp_path)] == [b"r0", b"r1", b"r2"]
    assert sum("does not support preallocation" in r.getMessage() for r in caplog.records) == 1


def test_a_snapshot_that_does_not_fit_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    from ledger.snapshot import list_snapshots, write_snapshot

    faults = DiskFaults(monkeypatch, tmp_path)
    faults.arm(errno.ENOSPC, "write")
    faults.partial_write = True
    with pytest.raises(OSError, match="No space left"):
        write_snapshot(tmp_path, 1, b"s" * 10_000)
    assert list(tmp_path.iterdir()) == []
    faults.disarm()
    write_snapshot(tmp_path, 1, b"s" * 10_000)
    assert [seq for seq, _ in list_snapshots(tmp_path)] == [1]


@pytest.mark.skipif(not wal_module.HAVE_DSYNC_WRITE, reason="no pwritev(RWF_DSYNC) on this platform")
def test_a_group_is_one_dsync_write_and_a_short_one_is_finished(tmp_path: Path, monkeypatch) -> None:
    import os

    real = os.pwritev
    calls: list[tuple[int, int]] = []

    def short_pwritev(fd: int, buffers, offset: int, flags: int = 0) -> int:  # the kernel may write less
        data = bytes(buffers[0])[:7]
        calls.append((len(data), flags))
        return real(fd, [data], offset, flags)

    monkeypatch.setattr(wal_module.os, "pwritev", short_pwritev)
    log = Wal.open(tmp_path)
    log.append(b"first")
    log.append(b"second")
    log.flush_sync()
    log.close()
    assert calls and all(flags == os.RWF_DSYNC for _, flags in calls)
    assert sum(size for size, _ in calls) == len(frame(1, b"first") + frame(2, b"second"))  # no write() besides
    assert on_disk(tmp_path) == frame(1, b"first") + frame(2, b"second")


@pytest.mark.skipif(not wal_module.HAVE_DSYNC_WRITE, reason="no pwritev(RWF_DSYNC) on this platform")
def test_a_file_system_without_dsync_writes_gets_write_and_fdatasync(tmp_path: Path, monkeypatch, caplog) -> None:
    def refuses(fd: int, buffers, offset: int, flags: int = 0) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    caplog.set_level(logging.INFO, logger="ledger.wal")
    faults = DiskFaults(monkeypatch, tmp_path)
    monkeypatch.setattr(wal_module.os, "pwritev", refuses)  # over the fault layer's: the kernel says no
    log = Wal.open(tmp_path)
    log.append(b"kept")
    log.flush_sync()
    log.append(b"too")
    log.flush_sync()
    log.close()
    assert [call for call, _ in faults.calls if call in ("write", "fdatasync")] == ["write", "fdatasync"] * 2
    assert sum("refuses RWF_DSYNC" in record.getMessage() for record in caplog.records) == 1  # once, then not tried
    assert replayed(tmp_path) == [(1, b"kept"), (2, b"too")]
