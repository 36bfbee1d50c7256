"""The partner outbox over real HTTP on loopback against the partner simulator (in-process).

Transaction notifications with their documented status/description, signatures, the partner down
then back (original keys), dead letters and the admin replay, per-balance order, replays at the
simulator, and a SIGKILL of `authsrv serve` while retries are pending."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import httpx
import pytest
import trio

from authsrv.config import load_config
from authsrv.notify import signing
from authsrv.notify.calls import CallKind, PartnerCall, derived_key
from authsrv.notify.outbox import DEAD, DELIVERED, PENDING, OutboxStore
from authsrv.notify.worker import backoff_ms
from authsrv.store.db import Store
from simulators.partner import PartnerSimSettings, running_partner
from tests.conftest import ServerProcess, start_in_process
from tests.isoclient import IsoClient, auth, reversal_of
from tests.restclient import https

pytestmark = pytest.mark.timeout(60)
WAIT_S = 15.0
FAST = {"delivery__backoff_initial_ms": 50, "delivery__backoff_max_s": 1}


def configure_partner(data_dir: Path, partner: str, **settings) -> None:
    """Edit the `[partners.NAME]` table of authsrv.toml (before the server starts)."""
    path = data_dir / "authsrv.toml"
    text = path.read_text()
    head, sep, table = text.partition(f"[partners.{partner}]\n")
    assert sep, partner
    for key, value in settings.items():
        rendered = json.dumps(value) if not isinstance(value, (list, tuple)) else json.dumps(list(value))
        table, count = re.subn(rf"^{key} = .*$", f"{key} = {rendered}", table, count=1, flags=re.MULTILINE)
        assert count == 1, key
    path.write_text(head + sep + table)
    load_config(data_dir)  # still valid


def configure_delivery(data_dir: Path, **settings) -> None:
    path = data_dir / "authsrv.toml"
    text = path.read_text()
    for key, value in settings.items():
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        assert count == 1, key
    path.write_text(text)
    load_config(data_dir)


async def received(sim_url: str, kind: str, count: int, *, timeout_s: float = WAIT_S) -> list[dict]:
    """Poll the simulator's `/_sim/received` until `count` calls of `kind` arrived."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=sim_url) as client:
        while True:
            found = (await client.get("/_sim/received", params={"kind": kind})).json()["received"]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await trio.sleep(0.05)


async def sim_stats(sim_url: str) -> dict:
    async with httpx.AsyncClient(base_url=sim_url) as client:
        return (await client.get("/_sim/stats")).json()


async def sim_mode(sim_url: str, **mode) -> None:
    async with httpx.AsyncClient(base_url=sim_url) as client:
        reply = await client.post("/_sim/mode", json=mode)
        assert reply.status_code == 200, reply.text


async def authorize(port: int, docs: list[dict]) -> list[dict]:
    client = await IsoClient.connect(port)
    try:
        return [await client.call(doc) for doc in docs]
    finally:
        await client.aclose()


def secret_of(data_dir: Path, partner: str = "demo") -> bytes:
    return signing.secret_path(data_dir, partner).read_bytes().strip()


def assert_signed(data_dir: Path, call: dict) -> None:
    assert call["signature"] and call["signatureTimestamp"], call
    assert signing.verify(secret_of(data_dir), call["signatureTimestamp"], call["signature"],
                          call["rawBody"].encode(), now=int(time.time()))
    # A changed body or a stale timestamp does not verify.
    assert not signing.verify(secret_of(data_dir), call["signatureTimestamp"], call["signature"],
                              call["rawBody"].encode() + b" ", now=int(time.time()))
    assert not signing.verify(secret_of(data_dir), call["signatureTimestamp"], call["signature"],
                              call["rawBody"].encode(), now=int(time.time()) + signing.TOLERANCE_S + 5)


# -- pure parts ------------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(7)
    waits = [backoff_ms(tries, initial_ms=100, max_s=2, rng=rng) for tries in range(1, 12)]
    assert 50 <= waits[0] <= 100 and 100 <= waits[1] <= 200 and 200 <= waits[2] <= 400
    assert all(1000 <= wait <= 2000 for wait in waits[5:])


def test_derived_keys_are_stable_uuids() -> None:
    first = derived_key("notify.transaction", "0100|00000123456|000001|1121221500|T1", "0")
    assert first == derived_key("notify.transaction", "0100|00000123456|000001|1121221500|T1", "0")
    assert first != derived_key("notify.transaction", "0100|00000123456|000001|1121221500|T1", "24")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", first)


def test_signature_verifies_and_secret_file_is_private(tmp_path: Path) -> None:
    secret = signing.load_or_create_secret(tmp_path, "demo")
    assert signing.load_or_create_secret(tmp_path, "demo") == secret  # made once
    assert (signing.secret_path(tmp_path, "demo").stat().st_mode & 0o777) == 0o600
    headers = signing.signed_headers(secret, 1_700_000_000, b'{"a":1}')
    assert headers[signing.SIGNATURE_HEADER].startswith("v1=")
    assert signing.verify(secret, headers[signing.TIMESTAMP_HEADER], headers[signing.SIGNATURE_HEADER], b'{"a":1}',
                          now=1_700_000_100)
    assert not signing.verify(b"0" * 64, headers[signing.TIMESTAMP_HEADER], headers[signing.SIGNATURE_HEADER],
                              b'{"a":1}', now=1_700_000_100)


def test_outbox_rows_dead_after_tries_and_replay(tmp_path: Path, data_dir: Path) -> None:
    from authsrv.notify.outbox import Outcome

    with Store.open(data_dir) as store:
        outbox = OutboxStore(store)
        call = PartnerCall(partner="demo", kind=CallKind.transaction, method="POST", path="/notifications/transaction",
                           body=b"{}", idempotency_key="k-1", order_key="balance:1", source="test")
        assert outbox.schedule([call, call], tries_max=2) == 1  # the key is unique
        (row,) = outbox.due(limit=10)
        assert outbox.record([Outcome(row.id, False, 500, "boom", 0)]) == []
        died = outbox.record([Outcome(row.id, False, 500, "boom", 0)])
        assert [dead.id for dead in died] == [row.id] and outbox.get(row.id).state == DEAD
        assert outbox.due(limit=10) == []
        replayed = outbox.replay(row.id)
        assert replayed.state == PENDING and replayed.tries == 0 and replayed.idempotency_key == "k-1"
        assert outbox.replay(row.id) is None  # only dead letters
        outbox.record([Outcome(row.id, True, 204, "", 0)])
        assert outbox.get(row.id).state == DELIVERED


# -- over HTTP -------------------------------------------------------------------------------------


async def test_transaction_notifications_signed_with_documented_codes(data_dir, cards):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            card = cards[0]
            approve = auth(card, amount=1234, cvc2=card["cvc2"])
            decline = auth(card, amount=100_001, cvc2=card["cvc2"])  # above the seeded 100,000
            wrong_cvc = auth(card, amount=100, cvc2="999" if card["cvc2"] != "999" else "998")
            answers = await authorize(server.iso_port, [approve, decline, wrong_cvc])
            assert [answer["39"] for answer in answers] == ["00", "51", "N7"]
            calls = await received(sim.url, "transaction", 3)
            assert len(calls) == 3, calls
            bodies = {call["body"]["transaction"]["externalTransactionId"]: call for call in calls}
            ok = bodies[approve["37"]]["body"]
            assert (ok["status"], ok["description"]) == ("SUCCESS", "APPROVED")
            assert ok["transaction"]["amount"] == 1234 and ok["transaction"]["category"] == "DEBIT"
            assert ok["transaction"]["transactionData"]["lastFourDigits"] == card["pan"][-4:]
            assert card["pan"] not in json.dumps(calls)
            short = bodies[decline["37"]]["body"]
            assert (short["status"], short["description"]) == ("DECLINED", "INSUFFICIENT_FUNDS")
            assert bodies[wrong_cvc["37"]]["body"]["status"] == "DECLINED"
            for call in calls:
                assert_signed(data_dir, call)
                assert call["idempotencyKey"]
            server.stop.set()


async def test_partner_down_then_back_gets_everything_with_the_original_keys(data_dir, cards):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST, delivery__tries_max=50)
            await sim_mode(sim.url, down=True)
            docs = [auth(card, amount=100 + i, cvc2=card["cvc2"]) for i, card in enumerate(cards[:6])]
            await authorize(server.iso_port, docs)
            store = OutboxStore(server.store)
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:  # the first call of each balance tried twice while down
                rows = [row for row in (store.get(i) for i in range(1, 20)) if row]
                firsts = {row.order_key: row for row in reversed(rows)}.values()
                if len(rows) == 6 and all(row.tries >= 2 for row in firsts):
                    break
                await trio.sleep(0.05)
            assert all(row.state == PENDING for row in rows) and all(row.tries >= 2 for row in firsts), rows
            keys_before = {row.idempotency_key for row in (store.get(i) for i in range(1, 20)) if row}
            assert len(keys_before) == 6
            await sim_mode(sim.url, down=False)
            calls = await received(sim.url, "transaction", 6)
            assert {call["idempotencyKey"] for call in calls} == keys_before
            assert {call["body"]["transaction"]["externalTransactionId"] for call in calls} == {d["37"] for d in docs}
            server.stop.set()


async def test_dead_letter_after_the_tries_then_admin_replay(data_dir, cards):
    configure_delivery(data_dir, tries_max=5)
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, delivery__backoff_initial_ms=10,
                                            delivery__backoff_max_s=1)
            await sim_mode(sim.url, fail5xx=1.0)
            card = cards[1]
            (answer,) = await authorize(server.iso_port, [auth(card, amount=777, cvc2=card["cvc2"])])
            assert answer["39"] == "00"
            outbox = OutboxStore(server.store)
            deadline = time.monotonic() + WAIT_S
            while not outbox.dead(limit=10) and time.monotonic() < deadline:
                await trio.sleep(0.05)
            (dead,) = outbox.dead(limit=10)
            assert dead.tries == 5 and dead.last_status == 500
            stats = (await sim_stats(sim.url))
            assert stats["endpoints"]["transaction"]["injected5xx"] == 5
            metrics = await _scrape(server.metrics_port)
            assert re.search(r'^authsrv_outbox_deliveries_total\{result="dead"\} 1\.0$', metrics, re.MULTILINE)
            await _wait_metric(server.metrics_port, "authsrv_outbox_dead_letters 1.0")
            await sim_mode(sim.url, fail5xx=0.0)
            async with admin_client(data_dir, server.rest_port) as admin:
                listed = (await admin.get("/admin/outbox/dead")).json()
                assert [item["id"] for item in listed["items"]] == [dead.id]
                assert listed["items"][0]["idempotencyKey"] == dead.idempotency_key
                reply = await admin.post(f"/admin/outbox/dead/{dead.id}/replay")
                assert reply.status_code == 200, reply.text
                assert (await admin.post(f"/admin/outbox/dead/{dead.id}/replay")).status_code == 404
            (call,) = await received(sim.url, "transaction", 1)
            assert call["idempotencyKey"] == dead.idempotency_key
            server.stop.set()


async def test_replayed_key_at_the_simulator_is_not_counted_twice(data_dir, cards):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            card = cards[2]
            await authorize(server.iso_port, [auth(card, amount=500, cvc2=card["cvc2"])])
            (call,) = await received(sim.url, "transaction", 1)
            outbox = OutboxStore(server.store)
            (row,) = [row for row in (outbox.get(i) for i in range(1, 5)) if row]
            assert row.state == DELIVERED or row.tries >= 1
            # The same row sent again (as after a crash before its result was written).
            with server.store.transaction():
                server.store.db.execute("UPDATE deliveries SET state = 'pending', next_at_ms = 0 WHERE id = ?",
                                        (row.id,))
            deadline = time.monotonic() + WAIT_S
            while outbox.get(row.id).state != DELIVERED and time.monotonic() < deadline:
                await trio.sleep(0.05)
            stats = (await sim_stats(sim.url))["endpoints"]["transaction"]
            assert stats["processed"] == 1 and stats["replays"] >= 1
            assert len(await received(sim.url, "transaction", 2, timeout_s=0.3)) == 1
            server.stop.set()


async def test_per_balance_order_holds_later_calls_behind_an_earlier_one(data_dir, cards):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, delivery__backoff_initial_ms=200,
                                            delivery__backoff_max_s=1)
            await sim_mode(sim.url, down=True)
            # Two cards of one user share its balance: the seed gives each user 2 cards.
            first, second = cards[4], cards[5]
            docs = [auth(first, amount=301, cvc2=first["cvc2"]), auth(second, amount=302, cvc2=second["cvc2"]),
                    auth(first, amount=303, cvc2=first["cvc2"])]
            await authorize(server.iso_port, docs)
            await trio.sleep(0.5)
            outbox = OutboxStore(server.store)
            rows = [row for row in (outbox.get(i) for i in range(1, 10)) if row]
            assert len({row.order_key for row in rows}) == 1, "one balance"
            assert rows[0].tries >= 1 and all(row.tries == 0 for row in rows[1:]), rows
            await sim_mode(sim.url, down=False)
            calls = await received(sim.url, "transaction", 3)
            assert [call["body"]["transaction"]["amount"] for call in calls] == [301, 302, 303]
            server.stop.set()


async def test_sigkill_with_retries_pending_then_restart_delivers_with_the_same_keys(data_dir, cards):
    configure_delivery(data_dir, backoff_initial_ms=100, backoff_max_s=1)
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        await sim_mode(sim.url, down=True)
        process = ServerProcess(data_dir)
        try:
            await trio.to_thread.run_sync(process.start)
            docs = [auth(card, amount=400 + i, cvc2=card["cvc2"]) for i, card in enumerate(cards[6:10])]
            answers = await authorize(process.iso_port, docs)
            assert all(answer["39"] == "00" for answer in answers)
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                stats = (await sim_stats(sim.url))["endpoints"]["transaction"]
                if stats["unavailable"] >= 8:  # retries are under way
                    break
                await trio.sleep(0.05)
            process.kill()
            with Store.open(data_dir) as store:
                rows = [row for row in (OutboxStore(store).get(i) for i in range(1, 10)) if row]
            assert len(rows) == 4 and all(row.state == PENDING for row in rows), rows
            # The first call of each balance was being retried (the others wait behind it).
            assert {row.order_key for row in rows if row.tries >= 1} == {row.order_key for row in rows}, rows
            keys = {row.idempotency_key for row in rows}
            await sim_mode(sim.url, down=False)
            await trio.to_thread.run_sync(process.start)
            calls = await received(sim.url, "transaction", 4)
            assert {call["idempotencyKey"] for call in calls} == keys
            await trio.sleep(0.3)
            assert len(await received(sim.url, "transaction", 5, timeout_s=0.1)) == 4
            assert process.terminate() == 0
        finally:
            process.cleanup()


async def test_a_record_journaled_but_not_scheduled_before_a_crash_is_scheduled_at_restart(data_dir, cards):
    """The crash window between the log commit and the delivery row: the journal scan finds it."""
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            server.journal.listeners.clear()  # as if the process died before scheduling
            card = cards[3]
            doc = auth(card, amount=911, cvc2=card["cvc2"])
            await authorize(server.iso_port, [doc])
            await trio.sleep(0.3)
            assert await received(sim.url, "transaction", 1, timeout_s=0.2) == []
            server.stop.set()
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            (call,) = await received(sim.url, "transaction", 1)
            assert call["body"]["transaction"]["externalTransactionId"] == doc["37"]
            server.stop.set()


async def _scrape(port: int) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/metrics")).text


async def _wait_metric(port: int, line: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while line not in (await _scrape(port)).splitlines() and time.monotonic() < deadline:
        await trio.sleep(0.1)
    assert line in (await _scrape(port)).splitlines()


@contextlib.asynccontextmanager
async def admin_client(data_dir: Path, port: int):
    async with https(data_dir, port) as client:
        password = (data_dir / "admin-password").read_text().strip()
        reply = await client.post("/admin/sessions", json={"username": "admin", "password": password})
        assert reply.status_code in (200, 201), reply.text
        client.headers["Authorization"] = f"Bearer {reply.json()['token']}"
        yield client


def test_the_documented_verification_snippet_verifies_our_signature(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "docs" / "partners.md").read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 (our own documentation)
    secret = signing.load_or_create_secret(tmp_path, "demo")
    body = b'{"status":"SUCCESS"}'
    headers = signing.signed_headers(secret, int(time.time()), body)
    assert namespace["verify"](secret, headers, body)
    assert not namespace["verify"](secret, headers, body + b"x")
    stale = signing.signed_headers(secret, int(time.time()) - 301, body)
    assert not namespace["verify"](secret, stale, body)


def _record(**fields):
    from authsrv.hotpath.journal import AuthRecord

    base = dict(key="0100|00000123456|000001|1121221500|T1", original_key="0100|00000123456|000001|1121221500",
                timestamp_ns=1_700_000_000 * 10**9, mti="0100", processing_code="000000", outcome=0,
                response_code="00", card_id=7, rrn="T1", amount=1000, currency="EUR", request_amount=1000)
    base.update(fields)
    return AuthRecord(**base)


@pytest.mark.parametrize("record_fields, kinds", [
    ({}, []),  # answered by the partner: nothing more to tell it
    ({"mti": "0120"}, ["force-debit"]),
    ({"mti": "0220", "processing_code": "200000"}, ["force-credit"]),
    ({"mti": "0120", "outcome": 24, "response_code": "91"}, []),
    ({"external": 3, "stand_in": True}, ["reversal", "force-debit"]),
    ({"external": 4, "stand_in": True, "processing_code": "280000"}, ["reversal", "force-credit"]),
    ({"external": 3, "stand_in": True, "outcome": 24, "response_code": "91"}, ["reversal"]),
    ({"external": 1, "stand_in": True, "outcome": 24, "response_code": "91"}, ["reversal"]),
    ({"external": 2, "outcome": 16, "response_code": "51"}, []),
    ({"external": 5}, []),  # in flight: the final record follows
    ({"mti": "0400", "reverses": "0100|00000123456|000001|1121221500|T0", "card_id": 0}, ["reversal"]),
    ({"mti": "0420", "reverses": "0100|00000123456|000001|1121221500|T0", "amount": 0}, []),
])
def test_calls_of_a_record_for_an_external_partner(record_fields, kinds) -> None:
    from authsrv.notify.calls import CardInfo, PartnerView, RecordLookups, calls_of_record

    original = _record(key="0100|00000123456|000001|1121221500|T0", rrn="T0")
    lookups = RecordLookups(
        card=lambda card_id: CardInfo(7, 3, 5, "ext", "1234") if card_id == 7 else None,
        partner=lambda name: PartnerView("external", frozenset(), True) if name == "ext" else None,
        original=lambda key: original if key == original.key else None)
    calls = calls_of_record(_record(**record_fields), lookups)
    assert [call.kind.value for call in calls] == kinds
    for call in calls:
        body = json.loads(call.body)
        assert body["balanceId"] == "5" and call.order_key == "balance:5"
        if call.kind is CallKind.reversal:
            assert body["referenceTransactionId"]


def test_recovered_in_flight_record_is_reversed_and_notified_as_declined() -> None:
    from authsrv.notify.calls import CardInfo, PartnerView, RecordLookups, calls_of_record, recovered_record

    lookups = RecordLookups(card=lambda card_id: CardInfo(7, 3, 5, "ext", "1234"),
                            partner=lambda name: PartnerView("external", frozenset({"transaction"}), True),
                            original=lambda key: None)
    calls = calls_of_record(recovered_record(_record(external=5)), lookups)
    assert [call.kind.value for call in calls] == ["reversal", "notify.transaction"]
    notification = json.loads(calls[1].body)
    assert (notification["status"], notification["description"]) == ("DECLINED", "UNKNOWN_ERROR")


def test_calls_of_events_follow_the_partners_notify_list() -> None:
    from authsrv.notify.calls import PartnerView, UserInfo, call_of_event

    user = lambda user_id: UserInfo(user_id, "leon@example.com", "Leon", "B") if user_id == 3 else None  # noqa: E731
    kyc = json.dumps({"customerId": 3, "formId": 9, "status": "REJECTED", "reason": "INVALID_CUSTOMER_DATA"})
    low = json.dumps({"partner": "demo", "type": "DEPOSIT", "currency": "EUR", "lowThreshold": 5, "available": 1})
    everything = PartnerView("internal", frozenset({"verification", "partner_balance"}), True)
    call = call_of_event(1, "demo", "kyc.rejected", kyc, "evt-1-ab", everything, user)
    assert call.path == "/notifications/verificationRejected" and call.idempotency_key == "evt-1-ab"
    assert json.loads(call.body) == {"verificationId": "9", "userId": 3, "email": "leon@example.com",
                                     "firstName": "Leon", "lastName": "B", "status": "REJECTED",
                                     "reason": "INVALID_CUSTOMER_DATA"}
    assert call_of_event(2, "demo", "partner_balance.low", low, "evt-2-cd", everything, user).path == (
        "/notifications/partnerBalanceLow")
    nothing = PartnerView("internal", frozenset({"transaction"}), True)
    assert call_of_event(1, "demo", "kyc.rejected", kyc, "evt-1-ab", nothing, user) is None
    assert call_of_event(3, "demo", "card.locked", "{}", "evt-3-ef", everything, user) is None
    assert call_of_event(1, "demo", "kyc.rejected", kyc, "evt-1-ab", None, user) is None
