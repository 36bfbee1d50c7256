"""Clearing planned off the event loop (authsrv/clearing/engine.py): the chunk is planned in a worker
thread against reads copied on the loop, then applied on the loop after checking those reads again.
Here the authorization changes between the plan and the apply (voided, partly reversed, expired by
the ledger, or expiring at the batch's actual timestamp): each record must post exactly once, by a
plan of the state it applies to, with the exception reported, and its stored row must hold the
transfers that were submitted (a re-run resubmits those)."""

from __future__ import annotations

import time

import trio

from authsrv.clearing import apply_clearing
from authsrv.clearing.engine import ClearingRun
from authsrv.clearing.records import parse_clearing_file
from authsrv.clearing.store import ClearingStore, RecordState
from ledger.state import HoldState
from ledger.types import Batch, TransferStatus
from tests.conftest import SEED_AMOUNT
from tests.isoclient import IsoClient, auth, reversal_of
from tests.test_clearing import balance, check_books, clearing_file, deps, record, solo  # noqa: F401 (fixture)

DAY_NS = 86_400 * 10**9


class Clock:
    """The run's clock: the real time plus an offset a test moves between plan and apply."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns


async def approve(client, card: dict, amount: int) -> tuple[dict, dict]:
    request = auth(card, amount=amount, cvc2=card["cvc2"])
    response = await client.call(request)
    assert response["39"] == "00", response
    return request, {"rrn": request["37"], "authCode": response["38"], "pan": card["pan"], "amount": amount}


async def planned_run(server, data_dir, *records: dict, clock: Clock | None = None):
    """A run whose first chunk is gathered on the loop and planned in a worker thread, not applied."""
    data = clearing_file(*records)
    run = ClearingRun(deps(server, data_dir), parse_clearing_file(data), "race.jsonl", clock_ns=clock or time.time_ns)
    assert run.start() is None
    planned = await trio.to_thread.run_sync(run.plan, run.gather())
    assert planned is not None and len(planned.rows) == len(records)
    return run, planned, data


async def apply_rest(server, run: ClearingRun, planned) -> None:
    seq = run.apply(planned)
    assert seq
    await server.ledger.wait_durable(seq)
    run.durable()
    assert run.finished
    run.finish()


def stored(server, data: bytes) -> list:
    identities = [line.identity for line in parse_clearing_file(data).lines]
    rows = ClearingStore(server.store).records(identities)
    return [rows[identity] for identity in identities]


def assert_rows_are_what_was_posted(server, data: bytes, stale_ids: list[int]) -> None:
    """Each row is applied and holds the transfers the ledger has; the stale plan's ids never posted."""
    ledger = server.ledger.ledger
    for row in stored(server, data):
        assert row.state == RecordState.applied
        assert [ledger.transfer_status(spec.id) for spec in row.transfers] == [TransferStatus.created] * len(
            row.transfers)
    assert [ledger.transfer_status(transfer_id) for transfer_id in stale_ids] == [None] * len(stale_ids)


async def test_no_change_between_plan_and_apply_plans_nothing_again(server, data_dir, solo):
    client = await IsoClient.connect(server.iso_port)
    made = [(await approve(client, card, 1_000 + 100 * n))[1] for n, card in enumerate(solo[:4])]
    run, planned, data = await planned_run(server, data_dir, *(record(one) for one in made))
    planned_ids = [spec.id for row in planned.rows for spec in row.transfers]
    await apply_rest(server, run, planned)
    assert run.replanned == 0 and run.summary.exact == 4 and run.summary.exceptions_count == 0
    assert [spec.id for row in stored(server, data) for spec in row.transfers] == planned_ids
    assert_rows_are_what_was_posted(server, data, [])
    check_books(server.ledger.ledger)


async def test_hold_voided_between_plan_and_apply_is_late_not_posted(server, data_dir, solo):
    """Planned as an exact post of the hold; a full reversal voids it before the batch. Submitting the
    plan would be refused (the clearing lost as `ledger_refused`); planned again it is force-posted
    as `late`, once, and reported."""
    card = solo[0]
    client = await IsoClient.connect(server.iso_port)
    request, made = await approve(client, card, 3_000)
    run, planned, data = await planned_run(server, data_dir, record(made))
    stale_ids = [spec.id for row in planned.rows for spec in row.transfers]
    hold_id = planned.rows[0].plan.hold_id
    assert planned.rows[0].plan.outcome == "exact" and hold_id
    assert (await client.call(reversal_of(request)))["39"] == "00"  # voids the hold
    await apply_rest(server, run, planned)
    summary = run.summary
    assert run.replanned == 1 and (summary.exact, summary.late, summary.applied) == (0, 1, 1)
    (exception,) = summary.exceptions
    assert "hold had closed" in exception.reason and exception.posted
    assert server.ledger.ledger.hold(hold_id).state is HoldState.voided
    assert planned.rows[0].plan.hold_id == 0  # the plan that applied: a forced post, no hold
    view = balance(server, card)
    assert view.posted == SEED_AMOUNT - 3_000 and view.debits_pending == 0  # charged once
    assert stored(server, data)[0].plan.outcome == "late"
    assert_rows_are_what_was_posted(server, data, stale_ids)
    check_books(server.ledger.ledger)


async def test_partial_reversal_between_plan_and_apply_replans_every_record_of_the_authorization(
        server, data_dir, solo):
    """Two parts of one authorization in one chunk (3,000 split, then 2,000, the last). A partial
    reversal leaves 4,000 held before the batch: the planned 3,000 + 2,000 final would overdraw the
    hold (refused). Planned again together: 3,000 split, then 1,000 posted final and 1,000 forced."""
    card = solo[1]
    client = await IsoClient.connect(server.iso_port)
    request, made = await approve(client, card, 10_000)
    run, planned, data = await planned_run(server, data_dir, record(made, 3_000), record(made, 2_000))
    assert [row.plan.outcome for row in planned.rows] == ["split", "partial"]
    stale_ids = [spec.id for row in planned.rows for spec in row.transfers]
    assert (await client.call(reversal_of(request, remaining=4_000)))["39"] == "00"
    await apply_rest(server, run, planned)
    summary = run.summary
    assert run.replanned == 2 and (summary.split, summary.over, summary.applied) == (1, 1, 2)
    assert summary.exceptions_count == 0
    hold = server.ledger.ledger.hold(planned.rows[0].plan.hold_id)
    assert (hold.state, hold.posted, hold.released) == (HoldState.posted, 4_000, 6_000)
    view = balance(server, card)
    assert view.posted == SEED_AMOUNT - 5_000 and view.debits_pending == 0  # both parts, each once
    assert [row.plan.outcome for row in stored(server, data)] == ["split", "over"]
    assert_rows_are_what_was_posted(server, data, stale_ids)
    check_books(server.ledger.ledger)


async def test_hold_expired_by_the_ledger_between_plan_and_apply(server, data_dir, solo):
    card = solo[2]
    client = await IsoClient.connect(server.iso_port)
    _, made = await approve(client, card, 2_500)  # MCC 5411: the hold expires after 7 days
    run, planned, data = await planned_run(server, data_dir, record(made))
    stale_ids = [spec.id for row in planned.rows for spec in row.transfers]
    hold_id = planned.rows[0].plan.hold_id
    result, seq = server.ledger.submit(Batch(timestamp_ns=time.time_ns() + 8 * DAY_NS))  # the idle tick, 8 days on
    await server.ledger.wait_durable(seq)
    assert hold_id in result.expired  # with the deposit partner's collateral hold
    await apply_rest(server, run, planned)
    assert run.replanned == 1 and (run.summary.exact, run.summary.late) == (0, 1)
    assert run.summary.exceptions[0].posted
    view = balance(server, card)
    assert view.posted == SEED_AMOUNT - 2_500 and view.debits_pending == 0
    assert_rows_are_what_was_posted(server, data, stale_ids)
    check_books(server.ledger.ledger)


async def test_deadline_reached_at_the_batchs_own_timestamp_replans(server, data_dir, solo):
    """Nothing changed in the ledger, but the batch applies later than planned, past the hold's
    deadline: the ledger expires the hold at the start of that batch, so the plan's post would be
    refused. The check compares the deadline with the batch's actual timestamp."""
    card = solo[3]
    client = await IsoClient.connect(server.iso_port)
    _, made = await approve(client, card, 1_700)
    clock = Clock()
    run, planned, data = await planned_run(server, data_dir, record(made), clock=clock)
    hold_id = planned.rows[0].plan.hold_id
    assert server.ledger.ledger.hold(hold_id).state is HoldState.pending
    stale_ids = [spec.id for row in planned.rows for spec in row.transfers]
    clock.offset_ns = 8 * DAY_NS
    await apply_rest(server, run, planned)
    assert run.replanned == 1 and (run.summary.exact, run.summary.late) == (0, 1)
    assert run.summary.exceptions_count == 1 and "ledger_refused" not in run.summary.exceptions[0].reason
    assert server.ledger.ledger.hold(hold_id).state is HoldState.expired
    view = balance(server, card)
    assert view.posted == SEED_AMOUNT - 1_700 and view.debits_pending == 0
    assert_rows_are_what_was_posted(server, data, stale_ids)
    check_books(server.ledger.ledger)


async def test_only_the_changed_authorization_is_planned_again(server, data_dir, solo):
    client = await IsoClient.connect(server.iso_port)
    request, changed = await approve(client, solo[4], 4_000)
    _, steady = await approve(client, solo[5], 4_000)
    run, planned, data = await planned_run(server, data_dir, record(steady), record(changed))
    steady_ids = [spec.id for spec in planned.rows[0].transfers]
    assert (await client.call(reversal_of(request)))["39"] == "00"
    await apply_rest(server, run, planned)
    assert run.replanned == 1 and (run.summary.exact, run.summary.late) == (1, 1)
    rows = stored(server, data)
    assert [spec.id for spec in rows[0].transfers] == steady_ids  # kept as planned in the worker
    assert [row.plan.outcome for row in rows] == ["exact", "late"]
    check_books(server.ledger.ledger)


async def test_rows_planned_in_the_worker_then_a_crash_are_resubmitted_by_the_rerun(server, data_dir, solo):
    """The worker wrote the rows `planned`, the process was gone before the apply: the re-run finds
    them and resubmits their very transfers (step(), against the live state), posting once."""
    client = await IsoClient.connect(server.iso_port)
    _, made = await approve(client, solo[6], 2_200)
    _, planned, data = await planned_run(server, data_dir, record(made))
    planned_ids = [spec.id for spec in planned.rows[0].transfers]
    summary = await apply_clearing(deps(server, data_dir), data, "race.jsonl")
    assert (summary.exact, summary.applied, summary.exceptions_count) == (1, 1, 0)
    assert [spec.id for spec in stored(server, data)[0].transfers] == planned_ids
    assert_rows_are_what_was_posted(server, data, [])
    assert balance(server, solo[6]).posted == SEED_AMOUNT - 2_200
    check_books(server.ledger.ledger)


async def test_stale_rows_of_a_crashed_run_are_refused_and_reported_never_posted_twice(server, data_dir, solo):
    """The documented limit: a crash between the worker's rows and the apply, the hold voided
    meanwhile. The re-run resubmits the stored chain (it cannot know whether it applied), the ledger
    refuses it, and the record is reported `ledger_refused`: nothing posted, nothing twice."""
    card = solo[7]
    client = await IsoClient.connect(server.iso_port)
    request, made = await approve(client, card, 2_400)
    _, _, data = await planned_run(server, data_dir, record(made))  # the worker's rows, never applied
    assert (await client.call(reversal_of(request)))["39"] == "00"
    summary = await apply_clearing(deps(server, data_dir), data, "race.jsonl")
    assert (summary.applied, summary.exceptions_count) == (0, 1)
    assert summary.exceptions[0].reason.startswith("ledger_refused") and not summary.exceptions[0].posted
    assert stored(server, data)[0].state == RecordState.failed
    assert balance(server, card).posted == SEED_AMOUNT and balance(server, card).debits_pending == 0
    check_books(server.ledger.ledger)


async def test_slices_of_one_chunk_expect_the_state_their_earlier_slices_left(server, data_dir, solo):
    """The server submits a chunk in slices with checkpoints between. Two parts of one authorization
    in two slices: the second's plan counted the first's post (overlay), so the state right after
    the first slice is what it expects, and nothing is planned again."""
    card = solo[8]
    client = await IsoClient.connect(server.iso_port)
    _, made = await approve(client, card, 9_000)
    run, planned, data = await planned_run(server, data_dir, record(made, 4_000), record(made, 3_000))
    first = run.apply(planned, 1)
    assert first and not planned.done
    await trio.sleep(0.05)  # what the server does in between: other work, here nothing touching the hold
    second = run.apply(planned, 1)
    assert second > first and planned.done
    await server.ledger.wait_durable(second)
    run.durable()
    run.finish()
    assert run.replanned == 0 and (run.summary.split, run.summary.partial) == (1, 1)
    assert balance(server, card).posted == SEED_AMOUNT - 7_000 and balance(server, card).debits_pending == 0
    assert_rows_are_what_was_posted(server, data, [])
    check_books(server.ledger.ledger)


async def test_a_reversal_between_two_slices_replans_the_later_slice(server, data_dir, solo):
    card = solo[9]
    client = await IsoClient.connect(server.iso_port)
    request, made = await approve(client, card, 9_000)
    run, planned, data = await planned_run(server, data_dir, record(made, 4_000), record(made, 3_000))
    stale_ids = [spec.id for spec in planned.rows[1].transfers]
    assert run.apply(planned, 1)
    # Field 95 = 5,000: 4,000 released of the 5,000 still held; 1,000 stays for the last part (3,000).
    assert (await client.call(reversal_of(request, remaining=5_000)))["39"] == "00"
    seq = run.apply(planned, 1)
    await server.ledger.wait_durable(seq)
    run.durable()
    run.finish()
    assert run.replanned == 1 and (run.summary.split, run.summary.over) == (1, 1)
    assert balance(server, card).posted == SEED_AMOUNT - 7_000 and balance(server, card).debits_pending == 0
    assert_rows_are_what_was_posted(server, data, stale_ids)
    check_books(server.ledger.ledger)


async def test_a_gather_in_pieces_with_a_reversal_in_between(server, data_dir, solo):
    """The server reads a chunk's RRNs in pieces, with checkpoints between. A hold voided after its
    RRN was read, while later RRNs are still being read, is found at submit like any other change."""
    client = await IsoClient.connect(server.iso_port)
    request, first = await approve(client, solo[10], 1_500)
    _, second = await approve(client, solo[11], 1_600)
    data = clearing_file(record(first), record(second))
    run = ClearingRun(deps(server, data_dir), parse_clearing_file(data), "race.jsonl")
    assert run.start() is None
    gathered = run.gather(1)
    assert list(gathered.reads) == [first["rrn"]]
    assert (await client.call(reversal_of(request)))["39"] == "00"  # between two pieces of the gather
    assert run.gather_more(gathered, 1) and list(gathered.reads) == [first["rrn"], second["rrn"]]
    planned = await trio.to_thread.run_sync(run.plan, gathered)
    await apply_rest(server, run, planned)
    assert run.replanned == 1 and (run.summary.exact, run.summary.late) == (1, 1)
    assert [row.plan.outcome for row in stored(server, data)] == ["late", "exact"]
    check_books(server.ledger.ledger)


async def test_the_worker_hands_the_gil_back_between_records(server, data_dir, solo):
    """On the server, parsing and planning in the worker pause every few lines and every record (a
    pause hands the GIL back once a millisecond has passed: engine.GilYield), so the event loop is
    not held up by them; never on the loop itself."""
    from authsrv.clearing import engine

    client = await IsoClient.connect(server.iso_port)
    made = [(await approve(client, card, 1_000))[1] for card in solo[12:16]]
    records = [record(one) for one in made] + [record({"rrn": f"9{n:011d}", "authCode": "", "pan": solo[0]["pan"],
                                                       "amount": 1}) for n in range(40)]  # forced posts
    pauses: list[str] = []

    def pause() -> None:
        assert trio.lowlevel.in_trio_run() is False  # a worker thread, not the loop
        pauses.append("pause")

    data = clearing_file(*records)
    run = await trio.to_thread.run_sync(engine._open_run, deps(server, data_dir), data, "pauses.jsonl", None, pause)
    parsed = len(pauses)
    assert parsed == len(records) // 16  # parse_clearing_file: every PAUSE_EVERY_LINES lines
    assert run.start() is None
    planned = await trio.to_thread.run_sync(run.plan, run.gather())
    assert len(pauses) - parsed == len(records) + len(records) // engine.PAUSE_EVERY_ROWS  # each record, rows
    await apply_rest(server, run, planned)
    assert (run.summary.exact, run.summary.forced) == (4, 40)
    check_books(server.ledger.ledger)


def test_gil_yield_releases_once_per_interval(monkeypatch):
    from authsrv.clearing import engine

    clock = [0.0]
    sleeps: list[float] = []
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(engine.time, "sleep", sleeps.append)
    pause = engine.GilYield(0.001)
    for _ in range(10):  # 0.25 ms apart: a release every fourth pause
        clock[0] += 0.00025
        pause()
    assert sleeps == [0, 0]
