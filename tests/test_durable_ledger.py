"""The durable ledger: replay, snapshots, idempotency across restarts, expiry, app blobs, verify."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import msgspec
import pytest
import trio

from ledger.durable import DurableLedger, LedgerFailedError, LedgerRecoveryError
from ledger.snapshot import SnapshotError, list_snapshots
from ledger.state import HoldState, TRANSFERS_PER_BATCH_MAX
from ledger.types import (
    AccountFlags,
    AccountKind,
    AccountSpec,
    AccountStatus,
    Batch,
    TransferFlags,
    TransferSpec,
    TransferStatus,
)
from ledger.verify import verify
from ledger.wal import WalFullError, list_segments

S = TransferStatus
T0 = 1_800_000_000 * 10**9  # a fixed ledger time: tests never read the wall clock
SECOND = 10**9
FUNDING, SETTLEMENT, FEES = 1, 2, 3
USERS = range(10, 20)

ACCOUNTS = (
    AccountSpec(FUNDING, "EUR", AccountKind.funding),
    AccountSpec(SETTLEMENT, "EUR", AccountKind.settlement),
    AccountSpec(FEES, "EUR", AccountKind.fee_income),
    *(
        AccountSpec(user, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits)
        for user in USERS
    ),
)


class Clock:
    def __init__(self) -> None:
        self.now_ns = T0

    def __call__(self) -> int:
        self.now_ns += 1_000
        return self.now_ns


def open_ledger(directory: Path, **options) -> DurableLedger:
    return DurableLedger.open(directory, clock_ns=options.pop("clock_ns", Clock()), **options)


def setup_accounts(durable: DurableLedger, fund: int = 1_000) -> None:
    result, _ = durable.submit(Batch(timestamp_ns=T0, accounts=ACCOUNTS))
    assert set(result.account_results) == {AccountStatus.created}
    funding = tuple(TransferSpec(100 + user, FUNDING, user, fund) for user in USERS)
    result, _ = durable.submit(Batch(timestamp_ns=T0 + 1, transfers=funding))
    assert set(result.transfer_results) == {S.created}


def random_batches(seed: int, count: int, first_id: int = 1_000, start_ns: int = T0 + SECOND):
    """Holds, partial and final posts, voids, short-lived holds, failing chains, fees."""
    rng = random.Random(seed)
    next_id = first_id
    open_holds: list[int] = []
    now = start_ns
    for _ in range(count):
        now += rng.randrange(1, 400_000_000)
        transfers: list[TransferSpec] = []
        roll = rng.random()
        user = rng.choice(USERS)
        if roll < 0.35:
            flags = TransferFlags.pending
            transfers.append(TransferSpec(next_id, user, SETTLEMENT, rng.randrange(1, 40), flags,
                                          timeout_s=rng.choice([0, 1, 2, 3600])))
            open_holds.append(next_id)
        elif roll < 0.55 and open_holds:
            hold = rng.choice(open_holds)
            flags = TransferFlags.post_pending | (TransferFlags.final if rng.random() < 0.5 else 0)
            transfers.append(TransferSpec(next_id, 0, 0, rng.randrange(0, 20), flags, pending_id=hold))
        elif roll < 0.65 and open_holds:
            hold = open_holds.pop(rng.randrange(len(open_holds)))
            transfers.append(TransferSpec(next_id, 0, 0, 0, TransferFlags.void_pending, pending_id=hold))
        elif roll < 0.85:  # linked hold + post; sometimes too large, so the chain fails
            amount = rng.choice([1, 2, 5, 10_000])
            transfers.append(TransferSpec(next_id, user, SETTLEMENT, amount,
                                          TransferFlags.pending | TransferFlags.linked))
            transfers.append(TransferSpec(next_id + 1, 0, 0, 0, TransferFlags.post_pending,
                                          pending_id=next_id))
            next_id += 1
        else:
            transfers.append(TransferSpec(next_id, user, FEES, rng.randrange(1, 5)))
        next_id += 1
        app = b"app-%d" % next_id if rng.random() < 0.5 else b""
        yield Batch(timestamp_ns=now, transfers=tuple(transfers), app=app)


def test_submit_then_reopen_gives_the_same_digest(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    results = [durable.submit(batch) for batch in random_batches(1, 400)]
    assert [seq for _, seq in results] == list(range(3, 403))
    statuses = {status for result, _ in results for status in result.transfer_results}
    assert {S.created, S.exceeds_credits, S.linked_event_failed} <= statuses
    assert any(result.expired for result, _ in results), "the workload must expire holds"
    digest = durable.ledger.digest()
    durable.close()

    durable = open_ledger(tmp_path)
    assert durable.ledger.digest() == digest
    assert (durable.last_seq, durable.durable_seq, durable.snapshot_seq) == (402, 402, 0)
    durable.close()


def test_snapshot_then_more_records_then_reopen(tmp_path: Path) -> None:
    batches = list(random_batches(2, 600))
    durable = open_ledger(tmp_path, segment_size_max=4096)
    setup_accounts(durable)
    for batch in batches[:200]:
        durable.submit(batch)
    assert durable.snapshot(b"app state 1") == 202
    for batch in batches[200:400]:
        durable.submit(batch)
    assert durable.snapshot(b"app state 2") == 402
    for batch in batches[400:]:
        durable.submit(batch)
    digest = durable.ledger.digest()
    first_seq = durable.wal.first_seq
    durable.close()
    # The log is kept from the OLDER kept snapshot on, so that one can stand in for the newest.
    assert [seq for seq, _ in list_snapshots(tmp_path)] == [202, 402]
    assert 1 < first_seq <= 203
    assert list_segments(tmp_path)[0][0] == first_seq

    durable = open_ledger(tmp_path)
    assert durable.ledger.digest() == digest
    assert (durable.snapshot_seq, durable.app_snapshot, durable.last_seq) == (402, b"app state 2", 602)
    durable.close()

    # And the same state from scratch: one ledger, every batch, no log at all.
    reference = open_ledger(tmp_path / "reference")
    setup_accounts(reference)
    for batch in batches:
        reference.submit(batch)
    assert reference.ledger.digest() == digest
    reference.close()


def hold_and_post(hold_id: int, user: int = 10, amount: int = 3) -> tuple[TransferSpec, ...]:
    return (
        TransferSpec(hold_id, user, SETTLEMENT, amount, TransferFlags.pending | TransferFlags.linked),
        TransferSpec(hold_id + 1, 0, 0, 0, TransferFlags.post_pending, pending_id=hold_id),
    )


@pytest.mark.parametrize("restart", ["reopen", "snapshot and reopen"])
def test_transfer_ids_stay_idempotent_across_restarts(tmp_path: Path, restart: str) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable, fund=10)
    result, _ = durable.submit_now(transfers=hold_and_post(500))
    assert result.transfer_results == (S.created, S.created)
    result, _ = durable.submit_now(transfers=(TransferSpec(600, 11, SETTLEMENT, 11),))
    assert result.transfer_results == (S.exceeds_credits,)  # a remembered business failure
    if restart == "snapshot and reopen":
        durable.snapshot()
    durable.close()

    durable = open_ledger(tmp_path)
    balance_before = durable.ledger.balance(10)
    result, _ = durable.submit_now(transfers=hold_and_post(500))
    assert result.transfer_results == (S.exists, S.exists)
    result, _ = durable.submit_now(transfers=(TransferSpec(600, 11, SETTLEMENT, 11),))
    assert result.transfer_results == (S.exceeds_credits,)
    different = (TransferSpec(500, 10, SETTLEMENT, 4, TransferFlags.pending),)
    result, _ = durable.submit_now(transfers=different)
    assert result.transfer_results == (S.exists_with_different_fields,)
    assert durable.ledger.balance(10) == balance_before
    assert durable.ledger.balance(10).posted == 10 - 3
    durable.close()


def test_expiry_is_replayed_deterministically(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    hold = TransferSpec(700, 10, SETTLEMENT, 25, TransferFlags.pending, timeout_s=2)
    result, _ = durable.submit(Batch(timestamp_ns=T0 + 10 * SECOND, transfers=(hold,)))
    assert result.transfer_results == (S.created,)
    result, _ = durable.submit(Batch(timestamp_ns=T0 + 11 * SECOND))
    assert result.expired == ()
    result, _ = durable.submit(Batch(timestamp_ns=T0 + 12 * SECOND))  # the deadline itself
    assert result.expired == (700,)
    digest = durable.ledger.digest()
    durable.close()

    # The reopened ledger expires the hold at the logged time, not at today's wall clock.
    durable = open_ledger(tmp_path)
    assert durable.ledger.digest() == digest
    view = durable.ledger.hold(700)
    assert view.state == HoldState.expired and view.released == 25
    assert durable.ledger.balance(10).available == 1_000
    result, _ = durable.submit_now(transfers=(TransferSpec(701, 0, 0, 0, TransferFlags.post_pending,
                                                           pending_id=700),))
    assert result.transfer_results == (S.pending_transfer_expired,)
    durable.close()


def test_zero_timestamp_means_the_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    durable = open_ledger(tmp_path, clock_ns=clock)
    result, _ = durable.submit(Batch(timestamp_ns=0, accounts=ACCOUNTS[:1]))
    assert result.timestamp_ns == clock.now_ns
    durable.close()
    durable = open_ledger(tmp_path, clock_ns=lambda: pytest.fail("replay must not read the clock"))
    assert durable.ledger.timestamp_ns == clock.now_ns
    durable.close()


def test_app_blobs_are_replayed_in_order_after_the_snapshot(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    sent: list[tuple[int, bytes]] = []
    for index in range(30):
        app = b"auth-%d" % index if index % 3 else b""
        _, seq = durable.submit_now(app=app)
        if app:
            sent.append((seq, app))
    durable.close()

    seen: list[tuple[int, bytes]] = []
    durable = open_ledger(tmp_path, on_app=lambda seq, app: seen.append((seq, app)))
    assert seen == sent
    snapshot_seq = durable.snapshot(b"journal image")
    _, seq = durable.submit_now(app=b"after the snapshot")
    durable.close()

    seen.clear()
    durable = open_ledger(tmp_path, on_app=lambda seq, app: seen.append((seq, app)))
    assert durable.app_snapshot == b"journal image"
    assert seen == [(seq, b"after the snapshot")] and seq == snapshot_seq + 1
    durable.close()


def test_ids_beyond_msgpack_range_survive_the_log(tmp_path: Path) -> None:
    wide = 2**126 + 12345
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    result, _ = durable.submit_now(transfers=(TransferSpec(wide, FUNDING, 10, 7, code=2**100),))
    assert result.transfer_results == (S.created,)
    digest = durable.ledger.digest()
    durable.close()
    durable = open_ledger(tmp_path)
    assert durable.ledger.digest() == digest and durable.ledger.transfer_status(wide) == S.created
    durable.close()


def test_full_log_buffer_applies_nothing(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path, buffer_bytes_max=600)
    setup_accounts(durable)
    refused = 0
    for index in range(50):
        digest = durable.ledger.digest()
        try:
            durable.submit_now(transfers=(TransferSpec(2_000 + index, FUNDING, 10, 1),))
        except WalFullError:
            refused += 1
            assert durable.ledger.digest() == digest  # memory untouched: log and memory agree
            durable.flush_sync()
    assert refused > 0
    digest = durable.ledger.digest()
    durable.close()
    durable = open_ledger(tmp_path)
    assert durable.ledger.digest() == digest
    assert durable.ledger.balance(10).posted == 1_000 + 50 - refused
    durable.close()


def test_an_apply_that_raises_stops_the_ledger(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    too_many = tuple(TransferSpec(10_000 + i, FUNDING, 10, 1) for i in range(TRANSFERS_PER_BATCH_MAX + 1))
    with pytest.raises(AssertionError):
        durable.submit_now(transfers=too_many)
    with pytest.raises(LedgerFailedError):
        durable.submit_now(transfers=(TransferSpec(9, FUNDING, 10, 1),))
    assert durable.last_seq == 2  # the failed batch never reached the log
    durable.close()
    durable = open_ledger(tmp_path)
    assert durable.last_seq == 2 and durable.ledger.balance(10).posted == 1_000
    durable.close()


async def test_group_commit_and_snapshot_async_under_load(tmp_path: Path) -> None:
    commits: list[int] = []
    durable = open_ledger(tmp_path, on_commit=lambda records, size, seconds: commits.append(records))
    setup_accounts(durable, fund=100_000)
    acknowledged: list[int] = []

    async def client(index: int) -> None:
        for round_ in range(20):
            hold_id = 1_000_000 + (index * 100 + round_) * 2
            result, seq = durable.submit_now(transfers=hold_and_post(hold_id, user=USERS[index % 10],
                                                                     amount=1))
            await durable.wait_durable(seq)
            assert durable.durable_seq >= seq
            assert result.transfer_results == (S.created, S.created)
            acknowledged.append(hold_id)

    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        async with trio.open_nursery() as clients:
            for index in range(50):
                clients.start_soon(client, index)
            await trio.sleep(0)
            snapshot_seq = await durable.snapshot_async(b"mid-run")
        nursery.cancel_scope.cancel()
    assert len(acknowledged) == 1000
    assert len(commits) < 1000 / 5 and sum(commits) == 2 + 1000  # the setup batches, then the load
    digest = durable.ledger.digest()
    durable.close()
    durable = open_ledger(tmp_path)
    assert durable.snapshot_seq == snapshot_seq and durable.ledger.digest() == digest
    assert all(durable.ledger.hold(hold_id).state == HoldState.posted for hold_id in acknowledged)
    durable.close()


async def test_snapshot_async_is_the_state_at_the_call_while_the_ledger_moves_on(tmp_path: Path) -> None:
    """The forked writer serializes the state of the moment of the call (copy-on-write), the app
    bytes included, while the parent keeps applying; a failing child is an error, no snapshot."""
    from ledger.durable import SnapshotChildError, decode_snapshot
    from ledger.snapshot import read_snapshot

    durable = open_ledger(tmp_path)
    setup_accounts(durable, fund=100_000)
    for hold_id in range(2_000_000, 2_000_200, 2):
        durable.submit_now(transfers=hold_and_post(hold_id, amount=1))
    durable.flush_sync()
    at_call = durable.ledger.digest()
    calls: list[str] = []

    def app() -> bytes:  # runs in the child: the parent never sees this list grow
        calls.append("child")
        time.sleep(0.2)  # still serializing while the parent applies more
        return b"journal at the call"

    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        seq = durable.last_seq
        snapshotting = trio.Event()

        async def snapshot() -> None:
            assert await durable.snapshot_async(app) == seq
            snapshotting.set()

        nursery.start_soon(snapshot)
        while not durable._snapshot_running:  # noqa: SLF001 - set right after the fork
            await trio.sleep(0)
        for hold_id in range(3_000_000, 3_000_400, 2):  # the parent goes on meanwhile
            _, last = durable.submit_now(transfers=hold_and_post(hold_id, amount=1))
        await durable.wait_durable(last)
        await snapshotting.wait()

        durable.FORK_SNAPSHOTS = True
        durable.directory = tmp_path / "missing"  # the child cannot write: the parent says so
        with pytest.raises(SnapshotChildError):
            await durable.snapshot_async(b"x")
        durable.directory = tmp_path
        nursery.cancel_scope.cancel()
    assert calls == []
    snap_seq, payload = read_snapshot(list_snapshots(tmp_path)[-1][1])
    ledger, app_bytes = decode_snapshot(payload)
    assert (snap_seq, app_bytes, ledger.digest()) == (seq, b"journal at the call", at_call)
    assert durable.ledger.digest() != at_call
    final = durable.ledger.digest()
    durable.close()
    durable = open_ledger(tmp_path)
    assert durable.snapshot_seq == seq and durable.ledger.digest() == final
    durable.close()


# ----------------------------------------------------------------------------- damaged directories


def make_snapshotted(directory: Path) -> str:
    durable = open_ledger(directory, segment_size_max=2048)
    setup_accounts(durable)
    batches = list(random_batches(3, 300))
    for index, batch in enumerate(batches):
        durable.submit(batch)
        if index in (100, 200):
            durable.snapshot()
    digest = durable.ledger.digest()
    assert durable.wal.first_seq > 1
    durable.close()
    return digest


def test_deleted_snapshot_after_truncation_is_a_clear_error(tmp_path: Path) -> None:
    make_snapshotted(tmp_path)
    for _, path in list_snapshots(tmp_path):
        path.unlink()
    with pytest.raises(LedgerRecoveryError, match=r"log starts at seq \d+ but snapshot covers only up to seq 0"):
        open_ledger(tmp_path)


def test_damaged_newest_snapshot_falls_back_to_the_older_one(tmp_path: Path) -> None:
    digest = make_snapshotted(tmp_path)
    older, newest = list_snapshots(tmp_path)
    data = bytearray(newest[1].read_bytes())
    data[-5] ^= 0x40
    newest[1].write_bytes(data)
    durable = open_ledger(tmp_path)
    assert durable.snapshot_seq == older[0] and durable.ledger.digest() == digest
    durable.close()


def test_both_snapshots_damaged_is_an_error_naming_the_file(tmp_path: Path) -> None:
    make_snapshotted(tmp_path)
    for _, path in list_snapshots(tmp_path):
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40
        path.write_bytes(data)
    with pytest.raises(SnapshotError, match="checksum mismatch") as caught:
        open_ledger(tmp_path)
    assert "snapshot-" in str(caught.value)


def test_log_behind_the_snapshot_is_an_error(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    durable.snapshot()
    durable.close()
    for _, path in list_segments(tmp_path):
        path.unlink()
    with pytest.raises(LedgerRecoveryError, match="log ends at seq 0 but snapshot covers up to seq 2"):
        open_ledger(tmp_path)


# ----------------------------------------------------------------------------- verify


def test_verify_reports_totals_and_cross_checks(tmp_path: Path) -> None:
    make_snapshotted(tmp_path)
    durable = open_ledger(tmp_path)
    expected_digest, pending = durable.ledger.digest(), durable.ledger.pending_count()
    user_totals = durable.ledger.totals()[("EUR", AccountKind.user_balance)]
    durable.close()

    report = verify(tmp_path)
    assert report.ok and report.problems == []
    assert report.digest == expected_digest and report.pending_holds == pending
    assert report.cross_check.endswith("digest matches")
    as_json = json.loads(report.to_json())
    user = as_json["totals"]["EUR"]["user_balance"]
    assert user["debits_posted"] == user_totals.debits_posted
    assert user["balance"] == user_totals.credits_posted - user_totals.debits_posted
    assert set(as_json["totals"]["EUR"]) == {"user_balance", "settlement", "fee_income", "funding"}
    assert as_json["last_seq"] == 302 and as_json["snapshot_seq"] > 0
    # verify leaves the directory as it found it
    assert verify(tmp_path).digest == expected_digest


def test_verify_reports_a_corrupt_log(tmp_path: Path) -> None:
    make_snapshotted(tmp_path)
    first = list_segments(tmp_path)[0][1]
    data = bytearray(first.read_bytes())
    data[20] ^= 0x01
    first.write_bytes(data)
    report = verify(tmp_path)
    assert not report.ok
    assert f"{first} at byte offset 0" in report.problems[0]
    assert json.loads(report.to_json())["ok"] is False


def test_verify_of_a_missing_directory(tmp_path: Path) -> None:
    report = verify(tmp_path / "nope")
    assert not report.ok and "no ledger directory" in report.problems[0]
    assert not (tmp_path / "nope").exists()


def test_verify_refuses_a_directory_in_use(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    report = verify(tmp_path)
    assert not report.ok and "in use" in report.problems[0]
    durable.close()
    assert verify(tmp_path).ok


def test_snapshot_image_is_msgpack_of_ledger_and_app(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    durable.snapshot(b"blob")
    ledger_image = durable.ledger.to_snapshot()
    durable.close()
    from ledger.snapshot import load_latest_snapshot

    seq, payload = load_latest_snapshot(tmp_path)
    assert seq == 2 and msgspec.msgpack.decode(payload) == [ledger_image, b"blob"]


async def test_snapshot_from_a_worker_thread_while_the_committer_runs(tmp_path: Path) -> None:
    """The server may call snapshot() in a worker thread with submissions paused: the records
    still buffered must reach the disk (through the committer) before the snapshot covers them."""
    durable = open_ledger(tmp_path)
    setup_accounts(durable)
    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        for index in range(20):  # submitted, not waited for: still buffered
            durable.submit_now(transfers=(TransferSpec(3_000 + index, FUNDING, 10, 1),))
        last = durable.last_seq
        with trio.fail_after(10):
            seq = await trio.to_thread.run_sync(durable.snapshot, b"from a thread")
        assert seq == last and durable.durable_seq >= last
        nursery.cancel_scope.cancel()
    digest = durable.ledger.digest()
    durable.close()
    durable = open_ledger(tmp_path)
    assert (durable.snapshot_seq, durable.app_snapshot) == (last, b"from a thread")
    assert durable.ledger.digest() == digest
    durable.close()


def test_finish_logs_app_bytes_computed_from_the_result(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable, fund=5)
    decisions: list[tuple[int, bytes]] = []
    for hold_id in (800, 810):  # the second one finds too little left: declined
        def finish(result, hold_id=hold_id) -> bytes:
            return b"%d:%s" % (hold_id, result.transfer_results[0].name.encode())

        result, seq = durable.submit(Batch(timestamp_ns=0, transfers=hold_and_post(hold_id, amount=3)),
                                     finish=finish)
        decisions.append((seq, finish(result)))
    assert [app for _, app in decisions] == [b"800:created", b"810:exceeds_credits"]
    durable.close()
    seen: list[tuple[int, bytes]] = []
    durable = open_ledger(tmp_path, on_app=lambda seq, app: seen.append((seq, app)))
    assert seen == decisions
    durable.close()


def test_finish_that_raises_still_logs_the_applied_batch(tmp_path: Path) -> None:
    durable = open_ledger(tmp_path)
    setup_accounts(durable)

    def broken(result) -> bytes:
        raise ValueError("application bug")

    with pytest.raises(ValueError):
        durable.submit(Batch(timestamp_ns=0, transfers=hold_and_post(900)), finish=broken)
    assert durable.last_seq == 3  # applied, so logged (without app bytes)
    result, _ = durable.submit_now(transfers=(TransferSpec(950, FUNDING, 10, 1),))
    assert result.transfer_results == (S.created,)  # the ledger goes on
    digest = durable.ledger.digest()
    durable.close()
    seen: list[bytes] = []
    durable = open_ledger(tmp_path, on_app=lambda seq, app: seen.append(app))
    assert durable.ledger.digest() == digest and seen == []
    assert durable.ledger.hold(900).state == HoldState.posted
    durable.close()


def test_finish_with_a_full_buffer_applies_nothing(tmp_path: Path) -> None:
    from ledger.wal import RECORD_SIZE_MAX

    durable = open_ledger(tmp_path, buffer_bytes_max=RECORD_SIZE_MAX + 100)
    setup_accounts(durable)  # buffered, not flushed: less than a whole record of room is left
    digest = durable.ledger.digest()
    with pytest.raises(WalFullError):
        durable.submit(Batch(timestamp_ns=0, transfers=hold_and_post(990)), finish=lambda r: b"x")
    assert durable.ledger.digest() == digest
    durable.flush_sync()
    durable.submit(Batch(timestamp_ns=0, transfers=hold_and_post(990)), finish=lambda r: b"x")
    durable.close()
