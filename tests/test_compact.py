"""Snapshots built by replay in another process (ledger/compact.py, authsrv/compactor.py): the image
is the owner's state at the seq asked for, byte for byte, while the owner goes on appending; a
compactor that fails publishes nothing and truncates nothing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from ledger import durable as durable_module
from ledger.compact import PARENT_ENV, LedgerBounds
from ledger.durable import SnapshotChildError, decode_snapshot
from ledger.snapshot import list_snapshots, read_snapshot
from ledger.types import Batch
from ledger.wal import SEQ_FIRST, LogFollower, WalError, frame, list_segments, read_log
from tests.test_durable_ledger import hold_and_post, open_ledger, random_batches, setup_accounts

LEDGER_COMPACTOR = (sys.executable, "-m", "ledger.compact")


def without_app(batches):
    for batch in batches:
        yield msgspec.structs.replace(batch, app=b"")


def assert_reopens_the_same(durable, directory: Path, snapshot_seq: int) -> None:
    """Closed and opened again (recovery from the newest snapshot and the log): the same state."""
    digest = durable.ledger.digest()
    durable.close()
    reopened = open_ledger(directory)
    assert reopened.snapshot_seq == snapshot_seq and reopened.ledger.digest() == digest
    reopened.close()


async def test_a_compacted_snapshot_is_the_state_at_its_seq_while_the_owner_appends(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path, segment_size_max=4096)
    setup_accounts(durable, fund=100_000)
    batches = list(without_app(random_batches(7, 400)))
    for index, batch in enumerate(batches[:250]):
        durable.submit(batch)
        if index == 100:
            durable.snapshot()  # the compactor starts from this one, not from the empty ledger
    durable.flush_sync()
    durable.compactor = LEDGER_COMPACTOR
    at_call: list[tuple[int, bytes]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        done = trio.Event()

        async def snapshot() -> None:
            at_call.append((durable.last_seq, durable.ledger.to_snapshot()))  # no await until the call
            assert await durable.snapshot_async(b"not used: the compactor rebuilds the state") == at_call[0][0]
            done.set()

        nursery.start_soon(snapshot)
        for batch in batches[250:]:  # the owner appends (and rotates segments) meanwhile
            _, last = durable.submit(batch)
            await trio.sleep(0)
        await durable.wait_durable(last)
        with trio.fail_after(60):
            await done.wait()
        nursery.cancel_scope.cancel()
    [(seq, image)] = at_call
    assert durable.last_seq > seq + 100
    snap_seq, payload = read_snapshot(list_snapshots(tmp_path)[-1][1])
    ledger, app = decode_snapshot(payload)
    assert (snap_seq, app) == (seq, b"")
    assert ledger.to_snapshot() == image  # the state at the seq, byte for byte
    assert durable.snapshot_seq == seq
    older = list_snapshots(tmp_path)[0][0]
    assert [snapshot for snapshot, _ in list_snapshots(tmp_path)] == [older, seq] and older < seq
    assert list_segments(tmp_path)[0][0] <= older + 1 < list_segments(tmp_path)[1][0]  # kept from there
    assert_reopens_the_same(durable, tmp_path, seq)


async def test_replay_evicts_and_trims_by_the_owners_bounds_snapshot_after_snapshot(tmp_path: Path) -> None:
    """The operator's bounds are not in the log: the compactor replays with the owner's, passed at the
    call. Replayed with the defaults, the first image held every id since seq 1 under a bound of a
    few hundred, and the next compaction (or a restart) refused to load it."""
    durable = open_ledger(tmp_path, segment_size_max=4096)
    durable.ledger.set_bounds(ids_max=150, holds_pending_max=60, history_per_account_max=3)
    setup_accounts(durable, fund=100_000)
    durable.compactor = LEDGER_COMPACTOR
    batches = list(without_app(random_batches(11, 900)))
    images: list[tuple[int, bytes]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        for part in (batches[:300], batches[300:600], batches[600:]):
            for batch in part:
                durable.submit(batch)
            images.append((durable.last_seq, durable.ledger.to_snapshot()))
            assert await durable.snapshot_async() == images[-1][0]
        nursery.cancel_scope.cancel()
    assert durable.ledger.ids_evicted_count > 500  # the bound was at work all along
    for seq, image in images[1:]:  # the newest two are kept
        _, payload = read_snapshot(dict(list_snapshots(tmp_path))[seq])
        assert decode_snapshot(payload)[0].to_snapshot() == image
    assert_reopens_the_same(durable, tmp_path, images[-1][0])


async def test_a_failing_compactor_publishes_and_truncates_nothing(tmp_path: Path, monkeypatch) -> None:
    durable = open_ledger(tmp_path, segment_size_max=4096)
    setup_accounts(durable)
    for batch in random_batches(3, 200):  # app bytes: ledger.compact cannot rebuild them
        durable.submit(batch)
    durable.flush_sync()
    segments = list_segments(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        durable.compactor = LEDGER_COMPACTOR
        with pytest.raises(SnapshotChildError, match=r"exit 1.*carries application state"):
            await durable.snapshot_async()
        durable.compactor = (sys.executable, "-c", "import sys; sys.exit(3)")
        with pytest.raises(SnapshotChildError, match="exit 3"):
            await durable.snapshot_async()
        monkeypatch.setattr(durable_module, "COMPACTOR_TIMEOUT_S", 0.5)
        durable.compactor = (sys.executable, "-c", "import time; time.sleep(30)")
        with trio.fail_after(20), pytest.raises(SnapshotChildError, match="ran past"):
            await durable.snapshot_async()
        nursery.cancel_scope.cancel()
    assert list_snapshots(tmp_path) == [] and list_segments(tmp_path) == segments
    assert durable.snapshot_seq == 0
    digest = durable.ledger.digest()
    durable.close()
    assert open_ledger(tmp_path).ledger.digest() == digest


def test_read_log_stops_at_the_seq_asked_for_and_never_reads_past_it(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path, segment_size_max=1024)
    setup_accounts(durable)
    for hold_id in range(5_000, 5_200, 2):
        durable.submit_now(transfers=hold_and_post(hold_id, amount=1))
        durable.flush_sync()  # one group each: the segments rotate
    last = durable.last_seq
    assert len(list_segments(tmp_path)) >= 3
    expected = list(durable.wal.replay(10))
    durable.close()
    with pytest.raises(WalError, match=f"ends at seq {last}, before seq {last + 1}"):
        list(read_log(tmp_path, 10, last + 1))
    active = list_segments(tmp_path)[-1][1]
    with active.open("ab") as file:  # a record the owner is half way through writing
        file.write(b"\x40\x00\x00\x00" + (last + 1).to_bytes(8, "little") + b"torn")
    assert list(read_log(tmp_path, 10, last)) == expected
    assert [seq for seq, _ in read_log(tmp_path, last - 2, last - 1)] == [last - 2, last - 1]
    with pytest.raises(WalError, match="truncated record"):  # never taken for a record
        list(read_log(tmp_path, 10, last + 1))
    (tmp_path / list_segments(tmp_path)[0][1].name).unlink()
    with pytest.raises(WalError, match="starts at seq"):
        list(read_log(tmp_path, 1, last))


def test_a_log_follower_reads_records_as_they_land_and_waits_for_a_torn_one(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path, segment_size_max=1024)
    setup_accounts(durable)
    follower = LogFollower(tmp_path, SEQ_FIRST)
    seen: list[tuple[int, bytes]] = []
    for hold_id in range(5_000, 5_300, 2):
        durable.submit_now(transfers=hold_and_post(hold_id, amount=1))
        durable.flush_sync()  # one group each: the segments rotate
        if hold_id % 14 == 0:
            seen += follower.poll()  # while the owner writes, segment after segment
    seen += follower.poll()
    last = durable.last_seq
    assert len(list_segments(tmp_path)) >= 5
    assert seen == list(read_log(tmp_path, SEQ_FIRST, last)) and follower.next_seq == last + 1
    durable.close()
    assert list(follower.poll()) == []  # nothing new: nothing returned, nothing read twice
    record = frame(last + 1, b"x" * 300)
    active = list_segments(tmp_path)[-1][1]
    with active.open("ab") as file:  # a record the owner is half way through writing
        file.write(record[:100])
        file.flush()
        assert list(follower.poll()) == []  # not an error: it is not whole yet
        with pytest.raises(WalError, match=f"no whole record at seq {last + 1}"):
            list(follower.read_upto(last + 1, timeout_s=0.05))
        file.write(record[100:])
    assert list(follower.poll()) == [(last + 1, b"x" * 300)]
    small = LogFollower(tmp_path, 10)  # from the middle; records longer than a read are read whole
    small.READ_BYTES = 40
    assert list(small.read_upto(last + 1, timeout_s=1)) == seen[9:] + [(last + 1, b"x" * 300)]
    follower.close()
    small.close()


async def test_a_following_compactor_writes_each_snapshot_from_what_it_read_as_the_owner_wrote(
        tmp_path: Path, caplog) -> None:
    """It loads the newest snapshot once, then follows the log: each image is the owner's state
    at the seq it says, and it leaves when the owner closes its pipe."""
    caplog.set_level("INFO", logger="ledger.durable")
    durable = open_ledger(tmp_path, segment_size_max=4096)
    setup_accounts(durable, fund=100_000)
    batches = list(without_app(random_batches(13, 600)))
    for batch in batches[:100]:
        durable.submit(batch)
    durable.snapshot()  # it starts from this one
    durable.compactor = LEDGER_COMPACTOR
    states: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        await durable.start_compactor()
        process = durable._follower
        assert durable.compactor_follows
        for part in (batches[100:300], batches[300:450], batches[450:]):
            for batch in part:
                _, seq = durable.submit(batch)
                states[seq] = durable.ledger.to_snapshot()
                await trio.sleep(0.002)  # it reads while the owner writes
            with trio.fail_after(60):
                seq = await durable.snapshot_async()
            assert durable.snapshot_seq == seq and seq in states
            _, payload = read_snapshot(dict(list_snapshots(tmp_path))[seq])
            ledger, app = decode_snapshot(payload)
            assert app == b"" and ledger.to_snapshot() == states[seq]  # byte for byte
        assert await durable.stop_compactor() == ""
        nursery.cancel_scope.cancel()
    assert process.returncode == 0 and not durable.compactor_follows
    assert caplog.text.count("followed the log") == 3
    assert_reopens_the_same(durable, tmp_path, seq)


async def test_a_following_compactor_that_died_publishes_nothing_and_a_one_shot_takes_over(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path, segment_size_max=4096)
    setup_accounts(durable, fund=100_000)
    for batch in without_app(random_batches(5, 150)):
        durable.submit(batch)
    durable.flush_sync()
    durable.compactor = LEDGER_COMPACTOR
    segments = list_segments(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        await durable.start_compactor()
        durable._follower.kill()
        with trio.fail_after(30), pytest.raises(SnapshotChildError, match="gave no image for seq"):
            await durable.snapshot_async()
        assert not durable.compactor_follows
        assert list_snapshots(tmp_path) == [] and list_segments(tmp_path) == segments
        with trio.fail_after(60):
            seq = await durable.snapshot_async()  # a compactor for this snapshot alone
        nursery.cancel_scope.cancel()
    assert seq == durable.last_seq and [found for found, _ in list_snapshots(tmp_path)] == [seq]
    durable.close()


def test_the_ledger_compactor_refuses_bad_arguments(tmp_path: Path) -> None:
    import subprocess

    usage = "usage: python -m ledger.compact DIRECTORY SEQ|follow BOUNDS_JSON"
    done = subprocess.run([*LEDGER_COMPACTOR, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and usage in done.stderr
    done = subprocess.run([*LEDGER_COMPACTOR, str(tmp_path), "1", '{"ids_max": "many"}'],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Expected `int`, got `str`" in done.stderr and usage in done.stderr


async def test_the_switch_snapshots_by_replay_and_recovers_from_them(data_dir, cards) -> None:
    """The server's snapshots come from authsrv.compactor: ledger and journal equal to what the
    server had at that seq, so a restart answers duplicates from them as before."""
    from authsrv.app import open_ledger_and_journal
    from authsrv.config import load_config
    from tests.conftest import start_in_process
    from tests.isoclient import IsoClient
    from tests.test_switch import auth

    requests = [auth(cards[i % 8], amount=3) for i in range(55)]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, ledger__snapshot_interval_records=30)
        assert server.ledger.compactor[1:3] == ("-m", "authsrv.compactor")
        assert not server.ledger.compactor_follows  # started once the log holds a tenth of an interval
        client = await IsoClient.connect(server.iso_port)
        answers = [await client.call(request) for request in requests[:50]]
        with trio.fail_after(30):
            while server.ledger.snapshot_seq == 0:
                await trio.sleep(0.05)
        seq = server.ledger.snapshot_seq
        assert server.ledger.compactor_follows  # the image came from the compactor following the log
        answers += [await client.call(request) for request in requests[50:]]  # served on
        await client.aclose()
        server.stop.set()
    assert all(answer["39"] == "00" for answer in answers)
    ledger_dir = data_dir / "ledger"
    _, payload = read_snapshot(dict(list_snapshots(ledger_dir))[seq])
    compacted_ledger, compacted_journal = decode_snapshot(payload)
    # The same state rebuilt in this process, as a restart does: older snapshots and the log cut at `seq`.
    for snapshot_seq, path in list_snapshots(ledger_dir):
        if snapshot_seq >= seq:
            path.unlink()
    _cut_log_after(ledger_dir, seq)
    ledger, journal = open_ledger_and_journal(data_dir, load_config(data_dir))
    try:
        assert ledger.last_seq == seq and ledger.snapshot_seq < seq
        assert ledger.ledger.to_snapshot() == compacted_ledger.to_snapshot()
        assert journal.to_snapshot() == compacted_journal and len(journal) >= 50
    finally:
        ledger.close()


def _cut_log_after(directory: Path, seq: int) -> None:
    """Keep only the records up to `seq`: the log of a server that stopped there."""
    from ledger.wal import FILE_MODE, frame, segment_path

    segments = list_segments(directory)
    records = list(read_log(directory, segments[0][0], seq))
    for _, path in segments:
        path.unlink()
    path = segment_path(directory, records[0][0])
    path.write_bytes(b"".join(frame(record_seq, payload) for record_seq, payload in records))
    path.chmod(FILE_MODE)


def test_an_empty_batch_log_compacts_to_the_same_empty_state(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    durable.submit(Batch(timestamp_ns=1))
    durable.flush_sync()
    durable.close()
    import subprocess

    bounds = msgspec.json.encode(LedgerBounds.of(durable.ledger)).decode()
    done = subprocess.run([*LEDGER_COMPACTOR, str(tmp_path), "1", bounds], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "seq 1: 1 records replayed after the snapshot at seq 0" in done.stdout
    # each phase timed, so an operator can match a slow second to loading, replay or writing
    assert re.search(r"\(snapshot loaded \d+\.\d\d s, replay \d+\.\d\d s, image written \d+\.\d\d s\)",
                     done.stdout), done.stdout
    assert (tmp_path / "snapshot-00000000000000000001.snap.tmp").exists()  # the owner publishes it


def test_a_compactor_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    """trio starts processes from worker threads that end when idle; the compactor must not die
    with that thread (it did, with prctl's parent-death signal: exit -9 half way through)."""
    import subprocess
    import threading

    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    durable.flush_sync()
    bounds = msgspec.json.encode(LedgerBounds.of(durable.ledger)).decode()
    durable.close()
    started: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: started.append(subprocess.Popen(
        [*LEDGER_COMPACTOR, str(tmp_path), "2", bounds], stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    thread.start()
    thread.join()  # gone before the compactor has even imported the ledger
    out, err = started[0].communicate(timeout=60)
    assert started[0].returncode == 0, err
    assert (tmp_path / "snapshot-00000000000000000002.snap.tmp").exists()


def test_a_compactor_whose_parent_died_exits(tmp_path: Path) -> None:
    import os
    import subprocess
    import time

    grandchild = ("from ledger.compact import become_compactor; become_compactor(); "
                  "import time; time.sleep(60)")
    parent = ("import os, subprocess, sys; "
              f"env = {{**os.environ, {PARENT_ENV!r}: str(os.getpid())}}; "
              f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}], env=env, stdout=subprocess.DEVNULL); "
              "print(p.pid, flush=True)")
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    pid = int(done.stdout)  # its parent has exited already, maybe before the compactor started
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the orphaned compactor was still running 10 s after its parent exited")


def test_a_compactor_runs_below_the_owner_on_the_cpu_and_the_disk() -> None:
    """nice +10 and the idle I/O class: its reads of cold files then queue behind the owner's log
    writes (a host that evicts cold page cache sends them to the disk)."""
    import os
    import subprocess

    from ledger.compact import IOPRIO_CLASS_IDLE, NICE_INCREMENT, io_priority_class

    if io_priority_class() is None:
        pytest.skip("no ioprio_get(2) on this platform")
    probe = ("import os; from ledger.compact import become_compactor, io_priority_class; "
             "before = os.nice(0); become_compactor(); print(os.nice(0) - before, io_priority_class())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, PARENT_ENV: str(os.getpid())})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(NICE_INCREMENT), str(IOPRIO_CLASS_IDLE)]
    assert io_priority_class() != IOPRIO_CLASS_IDLE  # this process is untouched
