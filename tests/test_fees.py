"""Fees (issue 6): every kind of the documents' list, charged in the same ledger batch as the
transaction, never past zero except for advices, given back by reversals; creation fees; the
monthly run charging once per period, with the conditional waiver and owed fees. After each
scenario the ledger invariants hold and the fee income reconciles with what was charged."""

from __future__ import annotations

import datetime
import json
import types
from pathlib import Path

import pytest
import trio

from authsrv.config import FeesConfig, load_config
from authsrv.feesrun import PERIOD_ONCE, FeeStore, creation_fee_transfers, fees_run_main, month_spend
from authsrv.hotpath import fees
from authsrv.hotpath.fees import FeeCode, FeeKind
from authsrv.rest import money
from authsrv.store.db import DataDirLock, Store
from ledger.types import Batch, TransferSpec
from ledger.verify import verify
from tests.conftest import SEED_AMOUNT, SEED_CARDS_PER_USER, SEED_USERS, start_in_process
from tests.isoclient import IsoClient, auth, reversal_of
from tests.test_fx import RATES, record_of, write_rates

DEMO_CONFIG_ID = "0019167984"
TRANSACTION_FEES = {"pos_fixed": 50, "pos_bp": 100, "ecommerce_fixed": 30, "ecommerce_bp": 200,
                    "atm_fixed": 200, "atm_bp": 50, "fx_bp": 150}


def set_program_fees(data_dir: Path, **schedule: int) -> None:
    with Store.open(data_dir) as store, store.transaction():
        store.db.execute("UPDATE programs SET fees_json = ? WHERE config_id = ?", (json.dumps(schedule), DEMO_CONFIG_ID))


def account_of(server, card: dict) -> int:
    return server.index.card_by_id(card["cardId"]).balance_account_id


def available(server, card: dict) -> int:
    return server.ledger.ledger.balance(account_of(server, card)).available


def fee_income(ledger, index) -> int:
    return ledger.ledger.balance(index.partner("demo").fee_income_account_ids["EUR"]).posted


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


# -- pure rules -------------------------------------------------------------------------------------


def test_program_fees_override_the_defaults_and_are_validated() -> None:
    defaults = FeesConfig(pos_fixed=10, monthly_per_card=99)
    schedule = fees.schedule_of('{"pos_fixed": 25, "atm_bp": 40}', defaults)
    assert (schedule.pos_fixed, schedule.atm_bp, schedule.monthly_per_card) == (25, 40, 99)
    assert fees.schedule_of("{}", defaults) == defaults
    for bad, rule in [('{"pos_fixd": 1}', "unknown field"), ('{"pos_bp": 10001}', "<= 10000"),
                      ('{"pos_fixed": -1}', ">= 0"), ("[1]", "object"), ("{", "not JSON")]:
        with pytest.raises(fees.FeesError, match=rule):
            fees.schedule_of(bad, defaults)
    book = fees.FeeBook(defaults, {"P1": '{"pos_bp": 5}', "BAD": '{"nope": 1}'}.get)
    assert book.schedule("P1").pos_bp == 5 and book.charges_transactions("P1")
    assert book.schedule("BAD") == defaults  # logged, charged the defaults
    assert not fees.FeeBook(FeesConfig(), lambda _: "{}").charges_transactions("any")


def test_kinds_amounts_and_rounding() -> None:
    assert fees.transaction_kind("00", "5411", "051") is FeeKind.pos
    assert fees.transaction_kind("00", "5411", "810") is FeeKind.ecommerce
    assert fees.transaction_kind("00", "5411", "100") is FeeKind.ecommerce
    assert fees.transaction_kind("01", "5411", "051") is FeeKind.atm
    assert fees.transaction_kind("00", "6011", "051") is FeeKind.atm
    schedule = FeesConfig(**TRANSACTION_FEES)
    assert fees.transaction_fee(schedule, FeeKind.pos, 10_000, False) == 150
    assert fees.transaction_fee(schedule, FeeKind.ecommerce, 10_000, False) == 230
    assert fees.transaction_fee(schedule, FeeKind.atm, 10_000, False) == 250
    assert fees.transaction_fee(schedule, FeeKind.pos, 922, True) == 50 + 9 + 14
    assert (fees.bp_of(50, 100), fees.bp_of(49, 100), fees.bp_of(0, 100)) == (1, 0, 0)  # 0.5 -> 1, 0.49 -> 0


def test_largest_payable_leaves_room_for_its_own_fee() -> None:
    schedule = FeesConfig(pos_fixed=50, pos_bp=100)

    def fee_of(amount: int) -> int:
        return fees.transaction_fee(schedule, FeeKind.pos, amount, False)

    for available in (0, 1, 50, 51, 52, 1000, 100_000, 99_999_999):
        payable = fees.largest_payable(available, fee_of)
        assert payable == 0 or payable + fee_of(payable) <= available
        assert (payable + 1) + fee_of(payable + 1) > available
    assert fees.largest_payable(100_000, fee_of) == 98_960


def test_refund_shares_add_up_to_the_fee() -> None:
    fee, amount = 157, 10_000
    outstanding, refunded = amount, 0
    for after in (7_000, 6_999, 2_500, 1, 0):
        refunded += fees.refund_share(fee, amount, outstanding, after)
        outstanding = after
    assert refunded == fee
    assert fees.refund_share(fee, amount, amount, amount) == 0


# -- the hot path -------------------------------------------------------------------------------------


async def test_each_transaction_fee_kind_is_charged_with_its_transaction(data_dir: Path, cards) -> None:
    set_program_fees(data_dir, **TRANSACTION_FEES)
    write_rates(data_dir, RATES)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        cases = [  # (card, request, fee, debited)
            (cards[0], auth(cards[0], amount=10_000), 150, 10_000),
            (cards[2], auth(cards[2], amount=10_000, **{"22": "810"}), 230, 10_000),
            (cards[4], auth(cards[4], mti="0200", processing="010000", amount=10_000), 250, 10_000),
            (cards[6], auth(cards[6], amount=1_000, currency="840"), 73, 922),  # FX: POS + conversion
            (cards[8], auth(cards[8], amount=1_000, currency="840", billing=(900, "978")), 50 + 9 + 14, 900),
            (cards[10], auth(cards[10], processing="200000", amount=700), 0, -700),  # a refund: no fee
            (cards[12], auth(cards[12], processing="300000", amount=0), 0, 0),  # an inquiry: no fee
        ]
        charged = 0
        for card, request, fee, debited in cases:
            response = await client.call(request)
            assert response["39"] == "00", (request["3"], response["39"])
            assert available(server, card) == SEED_AMOUNT - debited - fee
            assert record_of(server, response).fee == fee
            charged += fee
            assert fee_income(server.ledger, server.index) == charged
        history = server.ledger.ledger.history(account_of(server, cards[0]), limit=5)
        assert [entry.code for entry in history][:2] == [FeeCode.transaction, 1]  # the fee, after its hold
        server.ledger.ledger.check_invariants()
        server.stop.set()


async def test_the_fee_counts_in_the_balance_check_and_advices_force_it(data_dir: Path, cards) -> None:
    set_program_fees(data_dir, pos_fixed=50, pos_bp=100)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        over = await client.call(auth(cards[0], amount=98_961))  # 98,961 + 1,040 > 100,000
        assert over["39"] == "51" and available(server, cards[0]) == SEED_AMOUNT
        assert record_of(server, over).fee == 0
        exact = await client.call(auth(cards[0], amount=98_960))  # 98,960 + 1,040 = 100,000
        assert exact["39"] == "00" and available(server, cards[0]) == 0
        partial = await client.call(auth(cards[2], amount=200_000, **{"48": "61011"}))
        assert partial["39"] == "10" and partial["4"] == f"{98_960:012d}"
        assert available(server, cards[2]) == 0
        advice = await client.call(auth(cards[4], mti="0120", amount=SEED_AMOUNT))
        assert advice["39"] == "00" and available(server, cards[4]) == -1_050  # forced past zero, fee too
        assert fee_income(server.ledger, server.index) == 1_040 * 2 + 1_050
        server.ledger.ledger.check_invariants()
        server.stop.set()


async def test_reversals_give_the_fee_back_in_proportion(data_dir: Path, cards) -> None:
    set_program_fees(data_dir, pos_fixed=50, pos_bp=100)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        card = cards[0]
        original = auth(card, amount=10_000)
        assert (await client.call(original))["39"] == "00"
        assert available(server, card) == SEED_AMOUNT - 10_150
        partial = await client.call(reversal_of(original, remaining=4_000))
        assert partial["39"] == "00" and record_of(server, partial).fee == 90  # 150 - 150 * 0.4
        assert available(server, card) == SEED_AMOUNT - 4_060
        assert (await client.call(reversal_of(original)))["39"] == "00"
        assert available(server, card) == SEED_AMOUNT
        posted = auth(cards[2], mti="0200", amount=2_000)
        assert (await client.call(posted))["39"] == "00"
        assert server.ledger.ledger.balance(account_of(server, cards[2])).posted == SEED_AMOUNT - 2_070
        assert (await client.call(reversal_of(posted)))["39"] == "00"
        assert server.ledger.ledger.balance(account_of(server, cards[2])).posted == SEED_AMOUNT
        assert fee_income(server.ledger, server.index) == 0
        server.ledger.ledger.check_invariants()
        server.stop.set()


# -- creation fees ------------------------------------------------------------------------------------


async def test_creation_fees_once_and_owed_when_the_balance_is_short(data_dir: Path, cards) -> None:
    set_program_fees(data_dir, card_creation=250, account_creation=400)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        ctx = types.SimpleNamespace(store=server.store, index=server.index, ledger=server.ledger,
                                    config=load_config(data_dir))
        program = server.store.get_program(DEMO_CONFIG_ID)
        card = cards[0]
        balance = server.store.get_balance(card["balanceId"])
        transfers = creation_fee_transfers(ctx, program, FeeKind.card_creation, balance, card_id=card["cardId"])
        assert [(spec.amount, spec.code) for spec in transfers] == [(250, FeeCode.card_creation)]
        await money.submit(server.ledger, transfers=transfers)
        assert available(server, card) == SEED_AMOUNT - 250
        assert creation_fee_transfers(ctx, program, FeeKind.card_creation, balance, card_id=card["cardId"]) == []
        # a new balance has nothing yet: the whole fee is owed, for `authsrv fees run` to collect
        fresh, spec = server.store.create_balance(balance.user_id, "EUR")
        await money.submit(server.ledger, accounts=[spec])
        assert creation_fee_transfers(ctx, program, FeeKind.account_creation, fresh) == []
        row = FeeStore(server.store).get((DEMO_CONFIG_ID, "account_creation", PERIOD_ONCE, fresh.id))
        assert (row.amount, row.charged, row.owed) == (400, 0, 400)
        assert fee_income(server.ledger, server.index) == 250
        server.ledger.ledger.check_invariants()
        server.stop.set()
    # the balance is funded later; the next run collects what it owes (the month's fees are 0)
    fund(data_dir, fresh.ledger_account_id, 300)
    assert fees_run_main(data_dir, today()) == 0
    row = FeeStore_of(data_dir).get((DEMO_CONFIG_ID, "account_creation", PERIOD_ONCE, fresh.id))
    assert (row.charged, row.owed) == (300, 100)
    assert verify(data_dir / "ledger").ok


# -- the monthly run ------------------------------------------------------------------------------------


def FeeStore_of(data_dir: Path) -> FeeStore:  # noqa: N802 (reads like the class it opens)
    return FeeStore(Store.open(data_dir))


def open_offline(data_dir: Path):
    from authsrv.app import open_ledger_and_journal
    from authsrv.store.index import load_index

    ledger, journal = open_ledger_and_journal(data_dir, load_config(data_dir))
    store = Store.open(data_dir)
    return ledger, journal, store, load_index(store)


def fund(data_dir: Path, account_id: int, amount: int) -> None:
    ledger, journal, store, index = open_offline(data_dir)
    try:
        (transfer_id,) = store.allocate_transfer_ids(1)
        result, _ = ledger.submit(Batch(timestamp_ns=ledger.ledger.timestamp_ns + 1, transfers=(
            TransferSpec(transfer_id, index.funding_account("EUR"), account_id, amount, code=101),)))
        assert result.transfer_results[0].name == "created"
        ledger.flush_sync()
        ledger.snapshot(journal.to_snapshot())
    finally:
        ledger.close()
        store.close()


def test_monthly_fees_are_charged_once_per_period(data_dir: Path, cards, capsys) -> None:
    set_program_fees(data_dir, monthly_per_card=100, monthly_per_account=300)
    assert fees_run_main(data_dir, today()) == 0
    first = capsys.readouterr().out
    expected_count = SEED_USERS * SEED_CARDS_PER_USER + SEED_USERS
    assert f"{expected_count} charged" in first and "EUR: charged" in first
    ledger, _, store, index = open_offline(data_dir)
    try:
        per_balance = 100 * SEED_CARDS_PER_USER + 300
        for card in cards:
            assert ledger.ledger.balance(index.card_by_id(card["cardId"]).balance_account_id).posted == (
                SEED_AMOUNT - per_balance)
        assert fee_income(ledger, index) == per_balance * SEED_USERS
        digest = ledger.ledger.digest()
    finally:
        ledger.close()
        store.close()
    assert fees_run_main(data_dir, today()) == 0
    assert "already charged" in capsys.readouterr().out
    ledger, _, store, index = open_offline(data_dir)
    try:
        assert ledger.ledger.digest() == digest  # the second run changed nothing
    finally:
        ledger.close()
        store.close()
    assert verify(data_dir / "ledger").ok
    with DataDirLock.acquire(data_dir):  # as a running server holds it
        assert fees_run_main(data_dir, today()) == 2
    assert "server is running" in capsys.readouterr().err
    assert fees_run_main(data_dir, "2025-13-01") == 2


async def test_the_conditional_waiver_and_owed_monthly_fees(data_dir: Path, cards, capsys) -> None:
    set_program_fees(data_dir, monthly_per_account=SEED_AMOUNT + 1_000, monthly_waiver_spend=5_000)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        spender = cards[0]  # spends 6,000 of which 1,000 reversed: 5,000 is not more than 5,000
        original = auth(spender, amount=6_000)
        assert (await client.call(original))["39"] == "00"
        assert (await client.call(reversal_of(original, remaining=5_000)))["39"] == "00"
        big = cards[2]  # spends 5,001 (held, then posted in part by a clearing would count the same)
        assert (await client.call(auth(big, mti="0200", amount=5_001)))["39"] == "00"
        start = datetime.datetime.now(datetime.timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        start_ns = int(start.timestamp()) * 10**9
        assert month_spend(server.ledger.ledger, account_of(server, spender), start_ns, 2**62) == 5_000
        assert month_spend(server.ledger.ledger, account_of(server, big), start_ns, 2**62) == 5_001
        server.stop.set()
    assert fees_run_main(data_dir, today()) == 0
    out = capsys.readouterr().out
    assert f"{SEED_USERS - 1} partly or wholly owed" in out and "1 waived" in out
    ledger, _, store, index = open_offline(data_dir)
    try:
        spender_balance = ledger.ledger.balance(index.card_by_id(spender["cardId"]).balance_account_id)
        big_balance = ledger.ledger.balance(index.card_by_id(big["cardId"]).balance_account_id)
        assert spender_balance.available == 0  # charged all it had; the rest is owed
        assert big_balance.available == SEED_AMOUNT - 5_001  # waived
        owed = FeeStore(store).rows("owed > 0")
        assert len(owed) == SEED_USERS - 1
        assert {row.owed for row in owed if row.balance_id != spender["balanceId"]} == {1_000}
        assert fee_income(ledger, index) == sum(row.charged for row in FeeStore(store).rows("1 = 1"))
        ledger.ledger.check_invariants()
    finally:
        ledger.close()
        store.close()
    assert verify(data_dir / "ledger").ok
