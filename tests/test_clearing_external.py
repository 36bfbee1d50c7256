"""Clearing of external-balance authorizations and the partner's status update (issues 5 and 6):
the deposit collateral hold is posted at the cleared amount, the clearing writes one
`transaction.cleared` event per cleared authorization with the posting, and the outbox sends the
documents' `PUT /transactions/{id}` to the partner simulator over loopback HTTP, once."""

from __future__ import annotations

import json

import msgspec
import pytest
import trio

from authsrv.clearing import apply_clearing
from authsrv.clearing.cleared import CLEARED_EVENT_KIND, ClearedTransaction, cleared_decoder
from authsrv.clearing.engine import ClearingRun
from authsrv.clearing.records import parse_clearing_file
from authsrv.clearing.store import ClearingStore, RecordState
from authsrv.hotpath.external import transaction_id
from authsrv.hotpath.journal import AuthJournal, AuthRecord, holds_money, open_hold_id
from authsrv.notify.calls import CallKind, PartnerView, calls_of_event
from ledger.state import HoldState
from simulators.partner import PartnerSimSettings, running_partner
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth
from tests.test_clearing import check_books, clearing_file, deps, record
from tests.test_notify_outbox import FAST, configure_partner, received

pytestmark = pytest.mark.timeout(60)
PARTNER_AMOUNT = 50_000
QUIET_S = 0.6  # several dispatch polls (0.2 s): long enough for a call that should not come to come


def duplicate_key(response: dict) -> str:
    return f"{response['t'][:2]}00|{response['32'].zfill(11)}|{response['11']}|{response['7']}|{response['37']}"


async def authorize(server, card: dict, amount: int) -> dict:
    client = await IsoClient.connect(server.iso_port)
    try:
        response = await client.call(auth(card, amount=amount, cvc2=card["cvc2"]))
    finally:
        await client.aclose()
    assert response["39"] == "00", response
    return {"rrn": response["37"], "authCode": response["38"], "pan": card["pan"], "amount": amount,
            "key": duplicate_key(response), "card": card}


def deposit(server):
    partner = server.index.partner("demo")
    return server.ledger.ledger.balance(partner.collateral_account_ids["EUR"])


def usage(server):
    partner = server.index.partner("demo")
    return server.ledger.ledger.balance(partner.collateral_usage_account_ids["EUR"])


def cleared_events(server) -> list[ClearedTransaction]:
    events = server.store.events(after_id=0, limit=500)
    return [cleared_decoder.decode(event.body) for event in events if event.kind == CLEARED_EVENT_KIND]


# -- on a running server, against the partner simulator ----------------------------------------------


async def test_external_clearing_posts_the_collateral_and_puts_cleared_once(data_dir, cards):
    exact_card, under_card, over_card, split_card = cards[0], cards[2], cards[4], cards[6]
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, balance_mode="external")
        for card in (exact_card, under_card, over_card, split_card):
            sim.state.set_amount(str(card["customerId"]), str(card["balanceId"]), PARTNER_AMOUNT, "EUR")
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            deposit_before, usage_before = deposit(server), usage(server)
            exact = await authorize(server, exact_card, 1_000)
            under = await authorize(server, under_card, 2_000)
            over = await authorize(server, over_card, 3_000)
            split = await authorize(server, split_card, 4_000)
            made = (exact, under, over, split)
            for authorization in made:  # the collateral hold is the open authorization
                (found,) = server.journal.open_authorizations(authorization["rrn"])
                assert not found.user_hold_id and open_hold_id(found) == found.collateral_hold_id
            assert deposit(server).available == deposit_before.available - 10_000
            data = clearing_file(record(exact), record(under, 1_500), record(over, 3_250),
                                 record(split, 1_000), record(split, 2_500))
            deps_ = deps(server, data_dir)
            summary = await apply_clearing(deps_, data, "external.jsonl")
            assert (summary.exact, summary.partial, summary.over, summary.split) == (1, 2, 1, 1)
            assert summary.forced == summary.late == 0 and summary.cleared_events == 4
            # The deposit pays what was cleared (1,000 + 1,500 + 3,250 + 3,500), nothing is held any
            # more, and the excess of the over-clearing was forced from the deposit as well.
            assert deposit(server).posted == deposit_before.posted - 9_250
            assert deposit(server).available == deposit_before.available - 9_250
            assert usage(server).posted == usage_before.posted + 9_250
            for authorization in made:
                assert server.journal.open_authorizations(authorization["rrn"]) == []
                (closed,) = server.journal.closed_authorizations(authorization["rrn"])
                assert server.ledger.ledger.hold(closed.collateral_hold_id).state is HoldState.posted
            check_books(server.ledger.ledger)

            puts = await received(sim.url, "status-update", 4)
            by_id = {call["body"]["transactionId"]: call for call in puts}
            expected = {transaction_id(a["key"]): (a, amount) for a, amount in
                        ((exact, 1_000), (under, 1_500), (over, 3_250), (split, 3_500))}
            assert set(by_id) == set(expected) and len(puts) == 4
            for tx_id, (authorization, amount) in expected.items():
                body = by_id[tx_id]["body"]
                assert body["status"] == "CLEARED" and body["amount"] == amount and body["currency"] == "EUR"
                assert body["balanceId"] == str(authorization["card"]["balanceId"])
                assert authorization["pan"] not in json.dumps(by_id[tx_id])
            # The simulator applied each to the transaction its debit created.
            for authorization, amount in expected.values():
                (state,) = [postings for postings in sim.state.postings.values()
                            if postings and postings[-1].cleared_amount_minor == amount]
                assert state[-1].status == "CLEARED"
            events = cleared_events(server)
            assert sorted(event.amount for event in events) == [1_000, 1_500, 3_250, 3_500]
            assert {event.authorized_amount for event in events} == {1_000, 2_000, 3_000, 4_000}

            # The same file again, and its records in another file: nothing posts, nothing is sent.
            again = await apply_clearing(deps_, data, "external.jsonl")
            assert again.duplicate_file
            other = await apply_clearing(deps_, data + b"\n", "external-copy.jsonl")
            assert other.duplicates == 5 and other.applied == 0 and other.cleared_events == 0
            await trio.sleep(QUIET_S)
            assert len(await received(sim.url, "status-update", 5, timeout_s=0.1)) == 4
            assert len(cleared_events(server)) == 4
            assert deposit(server).posted == deposit_before.posted - 9_250
            check_books(server.ledger.ledger)
            server.stop.set()


async def test_internal_clearing_is_unchanged_and_notified_as_cleared(data_dir, cards):
    card = cards[0]
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])  # internal balances
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            authorization = await authorize(server, card, 700)
            account = server.index.card_by_id(card["cardId"]).balance_account_id
            before = server.ledger.ledger.balance(account)
            summary = await apply_clearing(deps(server, data_dir), clearing_file(record(authorization, 600)),
                                           "internal.jsonl")
            assert summary.partial == 1 and summary.cleared_events == 1
            after = server.ledger.ledger.balance(account)
            assert after.posted == before.posted - 600 and after.available == before.available + 100
            calls = await received(sim.url, "transaction", 2)
            statuses = sorted(call["body"]["transaction"]["status"] for call in calls)
            assert statuses == ["AUTHORIZED", "CLEARED"]
            (cleared,) = [call["body"] for call in calls if call["body"]["transaction"]["status"] == "CLEARED"]
            assert cleared["status"] == "SUCCESS" and cleared["transaction"]["amount"] == 600
            assert cleared["transaction"]["id"] == transaction_id(authorization["key"])
            await trio.sleep(QUIET_S)
            assert await received(sim.url, "status-update", 1, timeout_s=0.1) == []  # no PUT: internal
            check_books(server.ledger.ledger)
            server.stop.set()


async def test_crash_between_submit_and_applied_writes_the_event_once(data_dir, cards):
    """Rows planned and submitted, the process gone before `durable()`: the re-run resubmits (the
    ledger answers `exists`) and writes the event when the rows become applied, exactly once."""
    card = cards[0]
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, balance_mode="external")
        sim.state.set_amount(str(card["customerId"]), str(card["balanceId"]), PARTNER_AMOUNT, "EUR")
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            authorization = await authorize(server, card, 1_200)
            data = clearing_file(record(authorization))
            deps_ = deps(server, data_dir)
            first = ClearingRun(deps_, parse_clearing_file(data), "crash.jsonl")
            assert first.start() is None
            seq = first.step()
            await server.ledger.wait_durable(seq)  # durable, but the rows still say planned
            rows = ClearingStore(server.store).records([line.identity for line in
                                                         parse_clearing_file(data).lines])
            assert [row.state for row in rows.values()] == [RecordState.planned]
            assert cleared_events(server) == []
            summary = await apply_clearing(deps_, data, "crash.jsonl")
            assert summary.exact == 1 and summary.cleared_events == 1
            first.durable()  # the lost run waking up late moves nothing and writes nothing
            assert first.summary.cleared_events == 0
            (event,) = cleared_events(server)
            assert event.amount == 1_200 and event.transaction_id == transaction_id(authorization["key"])
            (put,) = await received(sim.url, "status-update", 1)
            assert put["body"]["amount"] == 1_200
            check_books(server.ledger.ledger)
            server.stop.set()


# -- pure parts ------------------------------------------------------------------------------------------


def _record(**fields) -> AuthRecord:
    base = dict(key="0100|k", original_key="0100|o", timestamp_ns=1, mti="0100", processing_code="000000",
                outcome=0, response_code="00", auth_code="A00001", card_id=1, rrn="R1", amount=100,
                currency="EUR")
    base.update(fields)
    return AuthRecord(**base)


def test_open_authorization_rule_for_external_records():
    external = _record(collateral_hold_id=7, external=1)
    assert open_hold_id(external) == 7 and holds_money(external)
    assert open_hold_id(_record(collateral_hold_id=7)) == 0  # internal: only a user hold is cleared
    assert open_hold_id(_record(user_hold_id=5, collateral_hold_id=7)) == 5
    assert not holds_money(_record(collateral_hold_id=7, external=1, posted=True))  # 0200: posted at once
    assert not holds_money(_record(collateral_hold_id=7, external=5, outcome=21, response_code="91"))
    pending = {7}
    journal = AuthJournal(retention_ns=10**12, hold_open=lambda hold_id: hold_id in pending)
    journal.add(_record(collateral_hold_id=7, external=5, outcome=21, response_code="91"))  # in flight
    assert journal.open_authorizations("R1") == []
    journal.add(external)  # the partner approved: the same key, now an approval
    assert [r.key for r in journal.open_authorizations("R1")] == ["0100|k"]
    restored = AuthJournal(retention_ns=10**12, hold_open=lambda hold_id: hold_id in pending)
    restored.load_snapshot(journal.to_snapshot())
    assert [r.key for r in restored.open_authorizations("R1")] == ["0100|k"]
    journal.add(_record(key="0100|k", external=1, outcome=21, response_code="91", stand_in=True))  # 91 late
    assert journal.open_authorizations("R1") == []
    pending.clear()
    assert restored.prune() == 1 and restored.closed_authorizations("R1")[0].key == "0100|k"


def test_cleared_event_maps_to_put_and_notification():
    cleared = ClearedTransaction(
        partner="demo", transaction_id="6f1c0c49-7b0f-5b1e-9a43-1d2b3c4d5e6f", balance_id=12, card_id=34,
        amount=1_500, currency="EUR", authorized_amount=2_000, original_amount=6_300, original_currency="PLN",
        record_id="R1", outcome="partial", processing_code="000000", authorized_at_ns=1_700_000_000 * 10**9,
        rrn="123456789012", mcc="5411", merchant_name="FROGSHOP LUBLIN", pan_last4="4242")
    body = msgspec.json.encode(cleared).decode()
    external = PartnerView(balance_mode="external", notify=frozenset(), has_api=True)
    (put,) = calls_of_event(9, "demo", CLEARED_EVENT_KIND, body, "evt-9-aa", external, lambda _: None)
    assert put.kind is CallKind.status_update and put.method == "PUT"
    assert put.path == f"/transactions/{cleared.transaction_id}" and put.idempotency_key == "evt-9-aa"
    assert put.order_key == "balance:12" and put.tries_max == 5
    sent = json.loads(put.body)
    assert (sent["status"], sent["amount"], sent["currency"]) == ("CLEARED", 1_500, "EUR")
    assert (sent["originalAmount"], sent["originalCurrency"]) == (6_300, "PLN")
    assert sent["transactionId"] == cleared.transaction_id and sent["balanceId"] == "12"
    both = PartnerView(balance_mode="external", notify=frozenset({"transaction"}), has_api=True)
    calls = calls_of_event(9, "demo", CLEARED_EVENT_KIND, body, "evt-9-aa", both, lambda _: None)
    assert [call.kind for call in calls] == [CallKind.status_update, CallKind.transaction]
    assert calls[1].idempotency_key != "evt-9-aa"
    assert json.loads(calls[1].body)["transaction"]["status"] == "CLEARED"
    internal = PartnerView(balance_mode="internal", notify=frozenset(), has_api=True)
    assert calls_of_event(9, "demo", CLEARED_EVENT_KIND, body, "evt-9-aa", internal, lambda _: None) == []
    no_api = PartnerView(balance_mode="external", notify=frozenset({"transaction"}), has_api=False)
    assert calls_of_event(9, "demo", CLEARED_EVENT_KIND, body, "evt-9-aa", no_api, lambda _: None) == []
