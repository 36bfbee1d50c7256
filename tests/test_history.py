"""Transaction history (`GET .../balances/{balanceId}/transactions`, authsrv/rest/history_api.py) after
approvals, declines, partial and full reversals, a 0200, a refund and a clearing run, on real loopback
sockets; paging, channels, bounds of the activity log, and a restart."""

from __future__ import annotations

import json

import pytest
import trio

from authsrv.hotpath.activity import ActivityLog
from authsrv.hotpath.journal import AuthRecord
from authsrv.hotpath.outcome import Outcome
from authsrv.rest.history_api import Statuses
from ledger.state import HistoryEntry, HistoryKind, Side
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth, reversal_of
from tests.restclient import admin_login, assert_problem, bearer, create_customer, customer_login, https

pytestmark = pytest.mark.timeout(60)


def masked(card: dict) -> str:
    return card["pan"][:6] + "******" + card["pan"][-4:]


def history_path(card: dict, root: str = "/secure/customers") -> str:
    return f"{root}/{card['customerId']}/balances/{card['balanceId']}/transactions"


@pytest.fixture
async def live(data_dir):
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        iso = await IsoClient.connect(server.iso_port)
        async with https(data_dir, server.rest_port, "partner") as partner, \
                https(data_dir, server.rest_port) as anonymous:  # fmt: skip
            password = (data_dir / "admin-password").read_text().strip()
            token = await admin_login(anonymous, "admin", password)
            async with https(data_dir, server.rest_port, headers=bearer(token)) as admin:
                yield server, iso, partner, admin, anonymous
        await iso.aclose()
        server.stop.set()


async def call(iso: IsoClient, card: dict, **fields) -> tuple[dict, dict]:
    request = auth(card, **fields)
    return request, await iso.call(request)


async def test_every_status_and_the_fields(live, cards, data_dir):
    server, iso, partner, admin, _ = live
    card, sibling = cards[0], cards[1]  # two cards on one balance
    assert card["balanceId"] == sibling["balanceId"]
    cleared_request, cleared = await call(iso, card, amount=1500, mcc="5812")
    reversed_request, reversed_ = await call(iso, card, amount=700)
    partial_request, partial = await call(iso, sibling, amount=900)
    _, declined = await call(iso, card, amount=100_001)  # over the seeded balance
    _, financial = await call(iso, card, mti="0200", amount=300)
    _, refund = await call(iso, card, processing="200000", amount=200)
    _, inquiry = await call(iso, card, processing="300000", amount=0)
    assert [r["39"] for r in (cleared, reversed_, partial, declined, financial, refund, inquiry)] == \
        ["00", "00", "00", "51", "00", "00", "00"]
    assert (await iso.call(reversal_of(reversed_request)))["39"] == "00"
    assert (await iso.call(reversal_of(partial_request, remaining=600)))["39"] == "00"
    line = {"recordId": "H1", "type": "purchase", "rrn": cleared_request["37"], "authCode": cleared["38"],
            "pan": card["pan"], "amount": 1400, "currency": "EUR", "billingAmount": 1400, "billingCurrency": "EUR",
            "mcc": "5812", "merchantName": "FROGSHOP LUBLIN", "date": "2026-09-14"}
    reply = await admin.post("/admin/clearing", content=json.dumps(line).encode() + b"\n",
                             headers={"content-type": "application/x-ndjson"})
    assert reply.status_code == 200 and reply.json()["matched"] == 1, reply.text

    reply = await partner.get(history_path(card))
    assert reply.status_code == 200, reply.text
    page = reply.json()
    rows = page["transactions"]
    assert page["next"] is None
    assert [row["status"] for row in rows] == ["CLEARED", "CLEARED", "DECLINED", "AUTHORIZED", "REVERSED", "CLEARED"]
    assert [row["type"] for row in rows] == ["REFUND", "PURCHASE", "PURCHASE", "PURCHASE", "PURCHASE", "PURCHASE"]
    assert [row["amount"] for row in rows] == [200, 300, 100_001, 900, 700, 1500]
    times = [row["time"] for row in rows]
    assert times == sorted(times, reverse=True) and all(t.endswith("Z") for t in times)
    refund_row, financial_row, declined_row, partial_row, reversed_row, cleared_row = rows
    assert cleared_row["clearedAmount"] == 1400 and cleared_row["mcc"] == "5812"
    assert cleared_row["authCode"] == cleared["38"] and cleared_row["rrn"] == cleared_request["37"]
    assert cleared_row["merchantName"] == "FROGSHOP LUBLIN" and cleared_row["country"] == "PL"
    assert cleared_row["maskedCard"] == masked(card) and cleared_row["cardId"] == card["cardId"]
    assert cleared_row["currency"] == "EUR" and cleared_row["fees"] == 0 and cleared_row["responseCode"] == "00"
    assert "billingAmount" not in cleared_row or cleared_row["billingAmount"] is None
    assert reversed_row["reversedAmount"] == 700
    assert partial_row["reversedAmount"] == 300 and partial_row["maskedCard"] == masked(sibling)
    assert declined_row["responseCode"] == "51" and declined_row["authCode"] is None
    assert declined_row["declineReason"] == Outcome.insufficient_funds.name
    assert financial_row["status"] == "CLEARED" and refund_row["type"] == "REFUND"
    text = reply.text
    for c in (card, sibling):
        assert c["pan"] not in text


async def test_paging_newest_first(live, cards):
    server, iso, partner, admin, _ = live
    card = cards[2]
    amounts = [101, 102, 103, 104, 105]
    for amount in amounts:
        assert (await call(iso, card, amount=amount))[1]["39"] == "00"
    seen, before = [], None
    for _ in range(10):  # bounded: 3 pages expected
        query = {"limit": 2} | ({"before": before} if before else {})
        page = (await partner.get(history_path(card), params=query)).json()
        seen.extend(row["amount"] for row in page["transactions"])
        before = page["next"]
        if before is None:
            break
    assert seen == amounts[::-1]
    # the admin channel, every role, shows the same
    admin_page = (await admin.get(history_path(card, "/admin/customers"), params={"limit": 100})).json()
    assert [row["amount"] for row in admin_page["transactions"]] == amounts[::-1]


async def test_bad_queries_and_foreign_balances(live, cards, data_dir):
    server, iso, partner, admin, anonymous = live
    card = cards[4]
    for query in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before": "-1"}, {"before": "9" * 30}):
        assert_problem(await partner.get(history_path(card), params=query), 400, "INVALID_PAYLOAD")
    other = cards[6]
    foreign = f"/secure/customers/{card['customerId']}/balances/{other['balanceId']}/transactions"
    assert_problem(await partner.get(foreign), 404, "BALANCE_NOT_FOUND")
    assert_problem(await partner.get(f"/secure/customers/{card['customerId']}/balances/0/transactions"), 404,
                   "BALANCE_NOT_FOUND")
    customer = await create_customer(partner)
    token = await customer_login(anonymous, customer)
    async with https(data_dir, server.rest_port, headers=bearer(token)) as me:
        balances = (await me.get("/customers/me/balances")).json()["balances"]
        if not balances:
            assert (await me.post("/customers/me/balances", json={"currency": "EUR"})).status_code == 201
            balances = (await me.get("/customers/me/balances")).json()["balances"]
        reply = await me.get(f"/customers/me/balances/{balances[0]['id']}/transactions")
        assert reply.status_code == 200 and reply.json() == {"transactions": [], "next": None}
        assert_problem(await me.get(f"/customers/me/balances/{card['balanceId']}/transactions"), 404,
                       "BALANCE_NOT_FOUND")


async def test_history_survives_a_restart(data_dir, cards):
    card = cards[8]
    rows = []
    for _ in range(2):  # bounded: before and after one restart
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir)
            iso = await IsoClient.connect(server.iso_port)
            if not rows:
                for amount in (11, 12):
                    assert (await iso.call(auth(card, amount=amount)))["39"] == "00"
            async with https(data_dir, server.rest_port, "partner") as partner:
                rows.append((await partner.get(history_path(card))).json()["transactions"])
            await iso.aclose()
            server.stop.set()
    assert rows[0] == rows[1] and [row["amount"] for row in rows[0]] == [12, 11]


# -- the activity log and the status fallback, directly ----------------------------------------------


def record(key: str, card_id: int, ts: int, **changes) -> AuthRecord:
    fields = dict(key=key, original_key=f"o{key}", timestamp_ns=ts, mti="0100", processing_code="000000",
                  outcome=0, response_code="00", card_id=card_id, amount=100, currency="EUR", user_hold_id=ts)
    fields.update(changes)
    return AuthRecord(**fields)


def test_activity_is_bounded_per_card_and_in_total():
    log = ActivityLog(per_card_max=3, total_max=5)
    for ts in range(1, 8):
        log.on_add(record(f"a{ts}", 1, ts), None, None)
    assert [r.timestamp_ns for r in log.of_card(1)] == [7, 6, 5] and len(log) == 3
    for ts in range(10, 14):
        log.on_add(record(f"b{ts}", 2, ts), None, None)
    assert len(log) == 5  # the total bound took the oldest entries
    assert [r.timestamp_ns for r in log.of_card(2)] == [13, 12, 11]
    assert [r.timestamp_ns for r in log.of_card(1)] == [7, 6]


def test_activity_leaves_out_inquiries_reversals_and_no_effect_advices_and_follows_replacements():
    log = ActivityLog()
    log.on_add(record("i", 1, 1, processing_code="300000"), None, None)
    log.on_add(record("n", 1, 2, user_hold_id=0), None, None)  # approved advice that moved nothing
    original = record("p", 1, 3)
    log.on_add(original, None, None)
    log.on_add(record("r", 0, 4, mti="0400", reverses="p", amount=40, user_hold_id=0), None, original)
    assert [(r.key, r.reversed_amount) for r in log.of_card(1)] == [("p", 40)]
    stand_in = record("p", 1, 3, outcome=int(Outcome.partner_unavailable), response_code="91", user_hold_id=0)
    log.on_add(stand_in, log.of_card(1)[0], None)
    assert [(r.key, r.response_code) for r in log.of_card(1)] == [("p", "91")]


class ForgetfulLedger:
    """A ledger that no longer remembers resolved holds (24 h later) but has the account history."""

    def hold(self, hold_id):
        return None

    def history(self, account_id, *, limit):
        def entry(ts, kind, pending_id):
            return HistoryEntry(ts, ts, pending_id, 100, 0, Side.debit, kind, False, 1, "rrn", 9)
        return [entry(5, HistoryKind.expire, 31), entry(4, HistoryKind.void, 30), entry(3, HistoryKind.post, 29),
                entry(2, HistoryKind.hold, 31)]  # newest first, as Ledger.history answers


def test_status_of_a_forgotten_hold_comes_from_the_account_history():
    statuses = Statuses(ForgetfulLedger(), 9)
    assert statuses.of_hold(29) == ("CLEARED", None)
    assert statuses.of_hold(30) == ("REVERSED", None)
    assert statuses.of_hold(31) == ("EXPIRED", None)
    assert statuses.of_hold(32) == (None, None)
