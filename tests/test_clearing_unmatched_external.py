"""Clearing records with no open authorization on an EXTERNAL-balance partner's card (issue 6
follow-up): the deposit collateral is force-posted (the card's local balance, which holds no money,
is not touched), a `transaction.forced` event is written once, and the outbox sends the partner
simulator `POST /transactions/force-debit` (a refund: force-credit) with the event's key. A late
record after the authorization EXPIRED first reverses the partner's own debit of it."""

from __future__ import annotations

import json

import msgspec
import pytest
import trio

from authsrv.clearing import apply_clearing
from authsrv.clearing.cleared import FORCED_EVENT_KIND, ForcedTransaction, forced_decoder, forced_transaction_id
from authsrv.clearing.records import parse_clearing_file
from authsrv.hotpath.external import transaction_id
from authsrv.notify.calls import CallKind, PartnerView, calls_of_event
from ledger.types import Batch
from simulators.partner import PartnerSimSettings, running_partner
from tests.conftest import start_in_process
from tests.test_clearing import check_books, clearing_file, deps, record
from tests.test_clearing_external import PARTNER_AMOUNT, QUIET_S, authorize, deposit, usage
from tests.test_notify_outbox import FAST, configure_partner, received

pytestmark = pytest.mark.timeout(60)
DAY_NS = 86_400 * 10**9


def forced_events(server) -> list[tuple[str, ForcedTransaction]]:
    events = server.store.events(after_id=0, limit=500)
    return [(event.idempotency_key, forced_decoder.decode(event.body)) for event in events
            if event.kind == FORCED_EVENT_KIND]


async def test_unmatched_late_and_refund_records_reach_the_partner_as_force_calls(data_dir, cards):
    unmatched_card, late_card, refund_card = cards[0], cards[2], cards[4]
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, balance_mode="external")
        for card in (unmatched_card, late_card, refund_card):
            sim.state.set_amount(str(card["customerId"]), str(card["balanceId"]), PARTNER_AMOUNT, "EUR")
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            late = await authorize(server, late_card, 1_000)
            assert sim.state.amount_of(str(late_card["balanceId"])) == PARTNER_AMOUNT - 1_000
            result, seq = server.ledger.submit(Batch(timestamp_ns=server.ledger.ledger.timestamp_ns + 7 * DAY_NS
                                                     + 10**9))
            await server.ledger.wait_durable(seq)
            (closed,) = server.journal.closed_authorizations(late["rrn"])
            assert closed.collateral_hold_id in result.expired
            locals_before = {card["cardId"]: server.ledger.ledger.balance(
                server.index.card_by_id(card["cardId"]).balance_account_id) for card in cards[:6:2]}
            deposit_before, usage_before = deposit(server), usage(server)

            phantom = {"rrn": "999999999997", "authCode": "", "pan": unmatched_card["pan"], "amount": 700}
            refund = {"rrn": "888888888887", "authCode": "", "pan": refund_card["pan"], "amount": 300}
            data = clearing_file(record(phantom), record(late, 1_100), record(refund, type="refund"))
            deps_ = deps(server, data_dir)
            summary = await apply_clearing(deps_, data, "external-forced.jsonl")
            assert (summary.forced, summary.late, summary.refunds, summary.matched) == (1, 1, 1, 0)
            assert summary.applied == 3 and summary.forced_events == 3 and summary.cleared_events == 0
            assert summary.totals["EUR"].cleared == 1_800 and summary.totals["EUR"].refunded == 300
            assert [entry.posted for entry in summary.exceptions] == [True, True]
            # The deposit pays the forced debits; the refund moves nothing here; no local balance moves.
            assert deposit(server).posted == deposit_before.posted - 1_800
            assert usage(server).posted == usage_before.posted + 1_800
            for card_id, before in locals_before.items():
                account = server.index.card_by_id(card_id).balance_account_id
                assert server.ledger.ledger.balance(account) == before
            check_books(server.ledger.ledger)

            events = forced_events(server)
            identities = [line.identity for line in parse_clearing_file(data).lines]
            assert [event.transaction_id for _, event in events] == [forced_transaction_id(i) for i in identities]
            by_outcome = {event.outcome: (key, event) for key, event in events}
            assert by_outcome["late"][1].reference_transaction_id == transaction_id(late["key"])
            assert by_outcome["late"][1].reverse_first == 1_000
            assert by_outcome["refund"][1].direction == "credit" and by_outcome["forced"][1].reverse_first == 0

            debits = await received(sim.url, "force-debit", 2)
            credits = await received(sim.url, "force-credit", 1)
            reversals = await received(sim.url, "reversal", 1)
            assert len(debits) == 2 and len(credits) == 1 and len(reversals) == 1
            keys = {call["body"]["transactionId"]: call["idempotencyKey"] for call in debits + credits}
            assert keys == {event.transaction_id: key for key, event in events}  # the events' own keys
            assert reversals[0]["body"]["referenceTransactionId"] == transaction_id(late["key"])
            assert reversals[0]["body"]["amount"] == 1_000
            for call in debits + credits + reversals:
                assert call["body"]["status"] in ("CLEARED", "REVERSED")
                assert unmatched_card["pan"] not in json.dumps(call) and late_card["pan"] not in json.dumps(call)
            # At the partner: 700 taken, the late one charged once (its debit reversed, then
            # force-debited at the cleared 1,100), 300 credited.
            assert sim.state.amount_of(str(unmatched_card["balanceId"])) == PARTNER_AMOUNT - 700
            assert sim.state.amount_of(str(late_card["balanceId"])) == PARTNER_AMOUNT - 1_100
            assert sim.state.amount_of(str(refund_card["balanceId"])) == PARTNER_AMOUNT + 300

            # The same records again (another file): duplicates; no event, no call, no money.
            other = await apply_clearing(deps_, data + b"\n", "external-forced-copy.jsonl")
            assert other.duplicates == 3 and other.applied == 0 and other.forced_events == 0
            await trio.sleep(QUIET_S)
            assert len(await received(sim.url, "force-debit", 3, timeout_s=0.1)) == 2
            assert len(forced_events(server)) == 3
            assert deposit(server).posted == deposit_before.posted - 1_800
            check_books(server.ledger.ledger)
            server.stop.set()


async def test_internal_unmatched_records_still_charge_the_local_balance(data_dir, cards):
    card = cards[0]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        account = server.index.card_by_id(card["cardId"]).balance_account_id
        before = server.ledger.ledger.balance(account).posted
        phantom = {"rrn": "999999999996", "authCode": "", "pan": card["pan"], "amount": 400}
        summary = await apply_clearing(deps(server, data_dir), clearing_file(record(phantom)), "internal.jsonl")
        assert summary.forced == 1 and summary.forced_events == 0
        assert server.ledger.ledger.balance(account).posted == before - 400
        assert forced_events(server) == []
        check_books(server.ledger.ledger)
        server.stop.set()


def test_forced_event_maps_to_force_calls() -> None:
    forced = ForcedTransaction(
        partner="demo", transaction_id=forced_transaction_id("abc"), direction="debit", balance_id=12, card_id=34,
        amount=1_500, currency="EUR", original_amount=6_300, original_currency="PLN", record_id="R1",
        outcome="forced", posted_at_ns=1_700_000_000 * 10**9, rrn="123456789012", mcc="5411",
        merchant_name="FROGSHOP LUBLIN", pan_last4="4242")
    external = PartnerView(balance_mode="external", notify=frozenset({"transaction"}), has_api=True)
    body = msgspec.json.encode(forced).decode()
    (call,) = calls_of_event(9, "demo", FORCED_EVENT_KIND, body, "evt-9-aa", external, lambda _: None)
    assert call.kind is CallKind.force_debit and call.path == "/transactions/force-debit"
    assert call.idempotency_key == "evt-9-aa" and call.order_key == "balance:12"
    sent = json.loads(call.body)
    assert (sent["amount"], sent["currency"], sent["status"]) == (1_500, "EUR", "CLEARED")
    assert sent["originalAmount"] == 6_300
    assert "referenceTransactionId" not in sent
    credit = msgspec.structs.replace(forced, direction="credit", outcome="refund")
    (call,) = calls_of_event(9, "demo", FORCED_EVENT_KIND, msgspec.json.encode(credit).decode(), "k", external,
                             lambda _: None)
    assert call.kind is CallKind.force_credit
    late = msgspec.structs.replace(forced, outcome="late", reference_transaction_id="tx-1", reverse_first=900)
    reversal, debit = calls_of_event(9, "demo", FORCED_EVENT_KIND, msgspec.json.encode(late).decode(), "k",
                                     external, lambda _: None)
    assert reversal.kind is CallKind.reversal and debit.kind is CallKind.force_debit
    assert json.loads(reversal.body)["amount"] == 900 and reversal.idempotency_key != "k"
    assert json.loads(debit.body)["referenceTransactionId"] == "tx-1"
    for view in (PartnerView(balance_mode="internal", notify=frozenset({"transaction"}), has_api=True),
                 PartnerView(balance_mode="external", notify=frozenset(), has_api=False), None):
        assert calls_of_event(9, "demo", FORCED_EVENT_KIND, body, "k", view, lambda _: None) == []
    assert forced_transaction_id("abc") == forced.transaction_id != forced_transaction_id("abd")
