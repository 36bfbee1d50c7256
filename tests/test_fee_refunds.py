"""Transaction fees when the transaction does not complete (issue 6 follow-up, docs/money.md "Fees"):
a hold that expires gives its whole fee back (FX part included), exactly once even when the
refund was lost in a crash; a hold cleared for less gives back the share of what was released,
by the rule of reversals; exact and over clearings keep the fee, and the excess carries none.
After each scenario the ledger invariants hold, the books balance per currency, and the fee
income equals the fees charged less the fees refunded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from authsrv.clearing.expiry import ExpiryFeeRefunds, watch_expiry_fees
from authsrv.hotpath import fees
from authsrv.hotpath.fees import FeeCode
from authsrv.store.db import Store
from ledger.state import HoldState
from ledger.types import Batch, TransferSpec, TransferStatus
from tests.conftest import SEED_AMOUNT, start_in_process
from tests.isoclient import IsoClient, auth, reversal_of
from tests.test_clearing import check_books, clear, record
from tests.test_fees import account_of, available, fee_income, open_offline, set_program_fees
from tests.test_fx import RATES, record_of, write_rates

pytestmark = pytest.mark.timeout(60)
DAY_NS = 86_400 * 10**9
POS_FEES = {"pos_fixed": 50, "pos_bp": 100, "fx_bp": 150}  # 10,000 -> 150; FX adds 1.5 %


async def approve(server, client: IsoClient, card: dict, amount: int, **fields) -> tuple[dict, dict]:
    """(the request, the clearing-side view of the approval: rrn, authCode, pan, amount)."""
    request = auth(card, amount=amount, **fields)
    response = await client.call(request)
    assert response["39"] == "00", response
    charged = record_of(server, response).amount
    return request, {"rrn": request["37"], "authCode": response["38"], "pan": card["pan"], "amount": charged}


def user_hold(server, approval: dict):
    found = server.journal.open_authorizations(approval["rrn"]) or server.journal.closed_authorizations(
        approval["rrn"])
    return found[-1]


async def advance(server, ns: int) -> tuple[int, ...]:
    """An empty batch stamped `ns` past the ledger's clock (the idle tick, days at once)."""
    result, seq = server.ledger.submit(Batch(timestamp_ns=max(time.time_ns(), server.ledger.ledger.timestamp_ns) + ns))
    await server.ledger.wait_durable(seq)
    await server.ledger.wait_durable(server.ledger.last_seq)  # the refund batch right after it
    return result.expired


# -- pure ------------------------------------------------------------------------------------------


def test_expiry_refund_ids_are_derived_and_meet_no_other_range() -> None:
    now_ns = time.time_ns()
    assert fees.expiry_fee_refund_id(now_ns) == fees.expiry_fee_refund_id(now_ns)
    assert fees.expiry_fee_refund_id(now_ns) != fees.expiry_fee_refund_id(now_ns + 1)
    management_base = 2**63  # authsrv/store/db.py MANAGEMENT_TRANSFER_ID_BASE
    for hold_id in (1, now_ns, fees.HOLD_ID_DERIVABLE_MAX):
        transfer_id = fees.expiry_fee_refund_id(hold_id)
        assert management_base + 2**62 <= transfer_id < 2**64
    for bad in (0, fees.HOLD_ID_DERIVABLE_MAX + 1):
        with pytest.raises(AssertionError):
            fees.expiry_fee_refund_id(bad)


# -- expiry ------------------------------------------------------------------------------------------


async def test_expired_holds_give_their_fee_back_once(data_dir: Path, cards) -> None:
    set_program_fees(data_dir, **POS_FEES)
    write_rates(data_dir, RATES)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        refunds = watch_expiry_fees(server.ledger, server.journal, server.index)
        assert watch_expiry_fees(server.ledger, server.journal, server.index) is refunds  # installed once
        client = await IsoClient.connect(server.iso_port)
        whole_card, reversed_card, fx_card, cleared_card = cards[0], cards[2], cards[4], cards[6]
        _, whole = await approve(server, client, whole_card, 10_000)
        original, partly = await approve(server, client, reversed_card, 10_000)
        _, converted = await approve(server, client, fx_card, 1_000, currency="840")  # 922 EUR, fee 73
        _, cleared = await approve(server, client, cleared_card, 10_000)
        assert (await client.call(reversal_of(original, remaining=4_000)))["39"] == "00"  # refunds 90
        assert user_hold(server, converted).fee == 73
        assert fee_income(server.ledger, server.index) == 150 + 60 + 73 + 150
        assert (await clear(server, data_dir, record(cleared))).exact == 1  # cleared: keeps its fee
        assert available(server, reversed_card) == SEED_AMOUNT - 4_000 - 60

        expired = await advance(server, 7 * DAY_NS + 60 * 10**9)
        holds = [user_hold(server, approval).user_hold_id for approval in (whole, partly, converted)]
        assert set(holds) <= set(expired)
        for hold_id in holds:
            assert server.ledger.ledger.hold(hold_id).state is HoldState.expired
            refund_id = fees.expiry_fee_refund_id(hold_id)
            assert server.ledger.ledger.transfer_status(refund_id) is TransferStatus.created
        for card in (whole_card, reversed_card, fx_card):
            assert available(server, card) == SEED_AMOUNT  # amount and the whole fee are back
        history = server.ledger.ledger.history(account_of(server, fx_card), limit=3)
        assert [(entry.code, entry.amount) for entry in history][0] == (FeeCode.transaction_refund, 73)
        assert fee_income(server.ledger, server.index) == 150  # only the cleared one's fee is kept
        assert available(server, cleared_card) == SEED_AMOUNT - 10_150

        # Exactly once: the scan finds nothing to do, a resubmission is `exists`, money unchanged.
        assert ExpiryFeeRefunds(server.ledger, server.journal, server.index).recover() == 0
        refund_id = fees.expiry_fee_refund_id(holds[0])
        income = server.index.partner("demo").fee_income_account_ids["EUR"]
        again, _ = server.ledger.submit(Batch(timestamp_ns=0, transfers=(TransferSpec(
            refund_id, income, account_of(server, whole_card), 150, code=FeeCode.transaction_refund,
            reference=whole["rrn"]),)))
        assert again.transfer_results == (TransferStatus.exists,)
        assert available(server, whole_card) == SEED_AMOUNT
        assert fee_income(server.ledger, server.index) == 150
        check_books(server.ledger.ledger)
        await client.aclose()
        server.stop.set()


async def test_a_refund_lost_in_a_crash_is_made_once_at_the_next_start(data_dir: Path, cards) -> None:
    """The log holds the expiring batch but not the refund (an offline batch expired the hold with
    no refund listener, as a crash between the two batches leaves it): the next start refunds it,
    and the start after that finds nothing to do."""
    set_program_fees(data_dir, **POS_FEES)
    card = cards[0]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        _, approval = await approve(server, client, card, 10_000)
        hold_id = user_hold(server, approval).user_hold_id
        await client.aclose()
        server.stop.set()
    ledger, journal, store, _ = open_offline(data_dir)
    try:
        assert not any(isinstance(getattr(listener, "__self__", None), ExpiryFeeRefunds)
                       for listener in ledger.expiry_listeners)
        result, _ = ledger.submit(Batch(timestamp_ns=ledger.ledger.timestamp_ns + 7 * DAY_NS + 10**9))
        assert hold_id in result.expired
        ledger.flush_sync()
        assert ledger.ledger.transfer_status(fees.expiry_fee_refund_id(hold_id)) is None
    finally:
        ledger.close()
        store.close()
    for start in range(2):
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir)
            refunds = watch_expiry_fees(server.ledger, server.journal, server.index)
            await server.ledger.wait_durable(server.ledger.last_seq)
            assert server.ledger.ledger.hold(hold_id).state is HoldState.expired
            status = server.ledger.ledger.transfer_status(fees.expiry_fee_refund_id(hold_id))
            assert status is TransferStatus.created, start
            assert available(server, card) == SEED_AMOUNT
            assert fee_income(server.ledger, server.index) == 0
            assert refunds.recover() == 0
            check_books(server.ledger.ledger)
            server.stop.set()
    with Store.open(data_dir):
        pass  # the store is intact and closed


# -- clearing ---------------------------------------------------------------------------------------


async def test_clearing_for_less_refunds_the_released_share(data_dir: Path, cards) -> None:
    set_program_fees(data_dir, **POS_FEES)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        under_card, split_card, reversed_card, exact_card, over_card = (cards[i] for i in (0, 2, 4, 6, 8))
        _, under = await approve(server, client, under_card, 10_000)
        _, split = await approve(server, client, split_card, 10_000)
        original, partly = await approve(server, client, reversed_card, 10_000)
        _, exact = await approve(server, client, exact_card, 10_000)
        _, over = await approve(server, client, over_card, 10_000)
        assert (await client.call(reversal_of(original, remaining=6_000)))["39"] == "00"  # fee 150 -> 90
        summary = await clear(server, data_dir, record(under, 2_500), record(split, 3_000), record(split, 2_000),
                              record(partly, 3_000), record(exact), record(over, 12_000))
        assert (summary.partial, summary.split, summary.exact, summary.over) == (3, 1, 1, 1)
        # kept = fee x cleared / authorized (floor): 37, 75, 45; the exact and over ones keep 150
        assert summary.totals["EUR"].fee_refunded == (150 - 37) + (150 - 75) + (90 - 45)
        assert available(server, under_card) == SEED_AMOUNT - 2_500 - 37
        assert available(server, split_card) == SEED_AMOUNT - 5_000 - 75
        assert available(server, reversed_card) == SEED_AMOUNT - 3_000 - 45
        assert available(server, exact_card) == SEED_AMOUNT - 10_150
        assert available(server, over_card) == SEED_AMOUNT - 12_150  # the excess carries no fee
        assert fee_income(server.ledger, server.index) == 37 + 75 + 45 + 150 + 150
        history = server.ledger.ledger.history(account_of(server, under_card), limit=3)
        assert (history[0].code, history[0].amount) == (FeeCode.transaction_refund, 113)
        # A later record for the same authorization is late: force-posted, with no fee either way.
        again = await clear(server, data_dir, record(under, 2_500), name="other.jsonl")
        assert again.late == 1 and again.totals["EUR"].fee_refunded == 0  # a late post carries no fee
        assert available(server, under_card) == SEED_AMOUNT - 5_000 - 37
        assert fee_income(server.ledger, server.index) == 37 + 75 + 45 + 150 + 150
        check_books(server.ledger.ledger)
        await client.aclose()
        server.stop.set()
